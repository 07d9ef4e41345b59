//! The D-Bus service against a private dbus-daemon: what targetcli asks
//! (the object manager's handlers, ConfigDesc, CheckConfig), asked both
//! with zbus and with the very GLib calls targetcli-fb makes.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tcmu_rbd::backends::handlers;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

const BIN: &str = env!("CARGO_BIN_EXE_tcmu-rbd");

struct Bus {
    child: Child,
    addr: String,
    sock: std::path::PathBuf,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bus {
    /// Stops dbus-daemon (as a crash or an upgrade would).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }

    /// Starts it again at the same address.
    fn start(&mut self) {
        self.child = spawn_bus(&self.conf).expect("dbus-daemon ran before");
        wait_for_socket(&self.sock);
    }
}

fn spawn_bus(conf: &std::path::Path) -> std::io::Result<Child> {
    Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .arg("--nofork")
        .stdout(Stdio::null())
        .spawn()
}

fn wait_for_socket(sock: &std::path::Path) {
    let end = Instant::now() + Duration::from_secs(5);
    while !sock.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sock.exists(), "dbus-daemon did not start");
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const OPEN_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>"#;

/// A private bus that lets anyone own and call anything, or None (with a
/// loud message) where dbus-daemon is not installed.
fn private_bus() -> Option<Bus> {
    bus_with("session", OPEN_POLICY)
}

/// A private bus with `policy` (busconfig elements) in its config.
fn bus_with(kind: &str, policy: &str) -> Option<Bus> {
    let dir = tempfile::tempdir().unwrap();
    // Other users must reach the socket (the policy test).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = dir.path().join("bus.sock");
    let conf = dir.path().join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policy}
</busconfig>
"#,
            sock.display()
        ),
    )
    .unwrap();
    let child = match spawn_bus(&conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: dbus-daemon not runnable ({e}); install the `dbus` package");
            return None;
        }
    };
    wait_for_socket(&sock);
    Some(Bus {
        child,
        addr: format!("unix:path={}", sock.display()),
        sock,
        conf,
        _dir: dir,
    })
}

struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn start_daemon(bus: &Bus) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).display().to_string();
    let child = Command::new(BIN)
        .args([
            "--dbus-address",
            &bus.addr,
            "--config",
            &p("none.conf"),
            "--run-dir",
            &p("run"),
            "--sysfs-root",
            &p("sys"),
            "--no-netlink",
            "--log-stderr",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon { child, _dir: dir }
}

fn connect(bus: &Bus) -> zbus::blocking::Connection {
    zbus::blocking::connection::Builder::address(bus.addr.as_str())
        .unwrap()
        .method_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn wait_for_name(conn: &zbus::blocking::Connection) {
    let dbus = zbus::blocking::fdo::DBusProxy::new(conn).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let name = "org.kernel.TCMUService1".try_into().unwrap();
        if dbus.name_has_owner(name).unwrap_or(false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("org.kernel.TCMUService1 never appeared on the bus");
}

type Managed = HashMap<OwnedObjectPath, HashMap<String, HashMap<String, OwnedValue>>>;

fn call<B, R>(
    conn: &zbus::blocking::Connection,
    path: &str,
    iface: &str,
    method: &str,
    body: &B,
) -> R
where
    B: zbus::export::serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> zbus::export::serde::Deserialize<'d> + zbus::zvariant::Type,
{
    let m = conn
        .call_method(
            Some("org.kernel.TCMUService1"),
            path,
            Some(iface),
            method,
            body,
        )
        .unwrap_or_else(|e| panic!("{method} on {path}: {e}"));
    m.body().deserialize().unwrap()
}

#[test]
fn targetcli_view_of_the_service() {
    let Some(bus) = private_bus() else { return };
    let _d = start_daemon(&bus);
    let conn = connect(&bus);
    wait_for_name(&conn);

    // The handlers targetcli will offer, each with its ConfigDesc.
    let objs: Managed = call(
        &conn,
        "/org/kernel/TCMUService1",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
        &(),
    );
    let mut got: Vec<(String, String)> = objs
        .iter()
        .map(|(p, ifaces)| {
            let props = &ifaces["org.kernel.TCMUService1"];
            let desc: String = props["ConfigDesc"].try_clone().unwrap().try_into().unwrap();
            (p.as_str().to_string(), desc)
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = handlers()
        .iter()
        .map(|h| {
            (
                format!("/org/kernel/TCMUService1/{}", h.subtype),
                h.config_desc.to_string(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(got.iter().any(|(p, _)| p.ends_with("/file")));
    assert!(got.iter().any(|(p, _)| p.ends_with("/ram")));

    // The property, read the standard way.
    let v: OwnedValue = call(
        &conn,
        "/org/kernel/TCMUService1/file",
        "org.freedesktop.DBus.Properties",
        "Get",
        &("org.kernel.TCMUService1", "ConfigDesc"),
    );
    let desc: String = v.try_into().unwrap();
    assert!(desc.contains("file"), "{desc}");

    // CheckConfig as targetcli sends it: "<subtype>/<cfgstring>".
    let t = tempfile::tempdir().unwrap();
    let good = format!("file/{}", t.path().join("new.img").display());
    let check = |path: &str, s: &str| -> (bool, String) {
        call(&conn, path, "org.kernel.TCMUService1", "CheckConfig", &(s,))
    };
    assert_eq!(
        check("/org/kernel/TCMUService1/file", &good),
        (true, "success".to_string())
    );
    let (ok, msg) = check("/org/kernel/TCMUService1/file", "file/relative.img");
    assert!(!ok);
    assert!(msg.contains("not an absolute path"), "{msg}");
    let (ok, msg) = check("/org/kernel/TCMUService1/file", "ram/x");
    assert!(!ok);
    assert!(msg.contains("\"file/\""), "{msg}");

    // ChangeMedium on a backstore that is not served: a clear error.
    let (ret, msg): (i32, String) = call(
        &conn,
        "/org/kernel/TCMUService1/ram",
        "org.kernel.TCMUService1",
        "ChangeMedium",
        &("disk9", 1u64 << 20, "ram/x"),
    );
    assert_eq!(ret, -libc::ENODEV);
    assert!(msg.contains("disk9"), "{msg}");

    // A second daemon refuses to run next to the first.
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args([
            "--dbus-address",
            &bus.addr,
            "--run-dir",
            dir.path().to_str().unwrap(),
            "--sysfs-root",
            dir.path().to_str().unwrap(),
            "--no-netlink",
            "--log-stderr",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("owned by another process"), "{err}");
}

/// The calls targetcli-fb's ui_backstore.py makes, through GLib's Gio, on
/// the "system" bus (pointed at the private bus).
#[test]
fn targetcli_gio_calls_work_unchanged() {
    let py = "/usr/bin/python3";
    let gi = Command::new(py)
        .args(["-c", "from gi.repository import Gio"])
        .output();
    if !gi.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: {py} with python3-gi is not installed");
        return;
    }
    let Some(bus) = private_bus() else { return };
    let _d = start_daemon(&bus);
    wait_for_name(&connect(&bus));
    let script = r#"
from gi.repository import Gio
bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
mgr = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, None,
        'org.kernel.TCMUService1', '/org/kernel/TCMUService1',
        'org.freedesktop.DBus.ObjectManager', None)
for k, v in sorted(mgr.GetManagedObjects().items()):
    iface = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, None,
            'org.kernel.TCMUService1', k, 'org.kernel.TCMUService1', None)
    name = k[k.rfind('/') + 1:]
    desc = v.get('org.kernel.TCMUService1', {}).get('ConfigDesc', 'No description.')
    ok, msg = iface.CheckConfig('(s)', name + '/' + ('/nonexistent-dir/x' if name == 'file' else 'x'))
    print('user:%s ok=%s msg=%s desc=%s' % (name, ok, msg, desc))
"#;
    let o = Command::new(py)
        .args(["-c", script])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.addr)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), handlers().len(), "{out}");
    let file = lines
        .iter()
        .find(|l| l.starts_with("user:file "))
        .expect("user:file");
    assert!(file.contains("ok=False"), "{file}");
    assert!(file.contains("directory is missing"), "{file}");
    let ram = lines
        .iter()
        .find(|l| l.starts_with("user:ram "))
        .expect("user:ram");
    assert!(ram.contains("ok=True msg=success"), "{ram}");
}

/// The system bus's default policy (Debian's system.conf) plus the
/// repository's policy file: root owns and calls the service, another
/// user can do neither.
#[test]
fn policy_file_lets_root_only() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the policy test needs root (it runs a client as nobody)");
        return;
    }
    let policy_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/org.kernel.TCMUService1.conf"
    );
    let policy = format!(
        r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>{policy_file}</include>"#
    );
    let Some(bus) = bus_with("system", &policy) else {
        return;
    };
    let _d = start_daemon(&bus);
    let conn = connect(&bus);
    wait_for_name(&conn);
    let (ok, _): (bool, String) = call(
        &conn,
        "/org/kernel/TCMUService1/ram",
        "org.kernel.TCMUService1",
        "CheckConfig",
        &("ram/x",),
    );
    assert!(ok, "root may call");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "dbus-send",
            ])
            .arg(format!("--bus={}", bus.addr))
            .arg("--print-reply")
            .args(args)
            .output()
            .expect("setpriv dbus-send")
    };
    let o = as_nobody(&[
        "--dest=org.kernel.TCMUService1",
        "/org/kernel/TCMUService1/ram",
        "org.kernel.TCMUService1.CheckConfig",
        "string:ram/x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nobody could call the service");
    assert!(err.contains("AccessDenied"), "{err}");
    // Nobody may not take the name either (it is free after the daemon stops).
    drop(_d);
    let o = as_nobody(&[
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        "string:org.kernel.TCMUService1",
        "uint32:4",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nobody could own the name");
    assert!(err.contains("AccessDenied"), "{err}");
}

/// A slow CheckConfig (rbd, monitors unreachable: it waits for its
/// timeout) does not hold up other calls, e.g. targetcli listing the
/// handlers meanwhile.
#[test]
fn a_slow_check_does_not_block_other_calls() {
    if !handlers().iter().any(|h| h.subtype == "rbd") {
        eprintln!("SKIPPED: no rbd handler compiled in");
        return;
    }
    let Some(bus) = private_bus() else { return };
    let _d = start_daemon(&bus);
    let conn = connect(&bus);
    wait_for_name(&conn);
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("ceph.conf");
    // Port 1 on loopback: nothing listens, the client waits for its timeout.
    std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:1\n").unwrap();
    let cfg = format!("rbd/rbd/img;conf={};osd_op_timeout=3", conf.display());
    let slow = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let r: (bool, String) = call(
                &conn,
                "/org/kernel/TCMUService1/rbd",
                "org.kernel.TCMUService1",
                "CheckConfig",
                &(cfg.as_str(),),
            );
            (r, start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let objs: Managed = call(
        &conn,
        "/org/kernel/TCMUService1",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
        &(),
    );
    let quick = start.elapsed();
    assert_eq!(objs.len(), handlers().len());
    let ((ok, msg), took) = slow.join().unwrap();
    assert!(!ok, "{msg}");
    // Relative to the check, not to the wall clock: on a loaded machine
    // (a VM beside the tests) the listing alone took over a second once.
    // A listing that waited for the check would end within 0.3 s of it.
    assert!(
        took >= Duration::from_secs(2),
        "check took {took:?}: the check was not slow, the test proves nothing"
    );
    assert!(
        quick + Duration::from_secs(1) < took,
        "listing took {quick:?} while a check of {took:?} was running: it waited for the check"
    );
}

fn answers_check_config(bus: &Bus) {
    let conn = connect(bus);
    wait_for_name(&conn);
    let (ok, msg): (bool, String) = call(
        &conn,
        "/org/kernel/TCMUService1/ram",
        "org.kernel.TCMUService1",
        "CheckConfig",
        &("ram/x",),
    );
    assert!(ok, "{msg}");
}

#[test]
fn the_service_comes_back_after_dbus_daemon_restarts() {
    let Some(mut bus) = private_bus() else { return };
    let _d = start_daemon(&bus);
    answers_check_config(&bus);
    // dbus-daemon goes away and comes back (a crash, an upgrade): the
    // daemon registers again by itself, and targetcli finds it.
    bus.stop();
    std::thread::sleep(Duration::from_secs(3));
    bus.start();
    answers_check_config(&bus);
}

#[test]
fn the_service_registers_once_the_bus_is_up() {
    let Some(mut bus) = private_bus() else { return };
    // No bus when the daemon starts (it came up first at boot).
    bus.stop();
    let _d = start_daemon(&bus);
    std::thread::sleep(Duration::from_secs(1));
    bus.start();
    answers_check_config(&bus);
}
