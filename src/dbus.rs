//! The D-Bus service tcmu-runner offers, so that targetcli's
//! `/backstores/user:<subtype>` works unchanged.
//!
//! targetcli (targetcli-fb's ui_backstore.py) asks the object manager at
//! `/org/kernel/TCMUService1` (bus name `org.kernel.TCMUService1`) for its
//! managed objects, makes one `user:<subtype>` backstore per object path
//! (the last path element), shows each object's `ConfigDesc` property in
//! `help create`, and calls `CheckConfig("<subtype>/<cfgstring>")` before
//! creating a backstore, refusing it with the returned message when the
//! answer is false. `ChangeMedium(name, size, "<subtype>/<cfgstring>")`
//! backs targetcli's `changemedium`.
//!
//! The object manager is written out here rather than zbus's: zbus's
//! would also list `HandlerManager1`, which targetcli would then offer as
//! a backstore type.

use crate::backends::{self, HandlerDesc};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

/// The well-known bus name.
pub const BUS_NAME: &str = "org.kernel.TCMUService1";
/// The object manager's path; handlers are `<ROOT_PATH>/<subtype>`.
pub const ROOT_PATH: &str = "/org/kernel/TCMUService1";
/// The handlers' interface.
pub const IFACE: &str = "org.kernel.TCMUService1";
/// Where tcmu-runner serves `org.kernel.TCMUService1.HandlerManager1`.
pub const HANDLER_MANAGER_PATH: &str = "/org/kernel/TCMUService1/HandlerManager1";

/// Applies `ChangeMedium`: point device `name` at a new config string and
/// size. Returns 0 or a negative errno with a message.
pub trait MediumChanger: Send + Sync {
    /// Changes `name`'s medium to `subtype`/`cfgstring` of `size` bytes.
    fn change_medium(
        &self,
        name: &str,
        size: u64,
        subtype: &str,
        cfgstring: &str,
    ) -> Result<(), (i32, String)>;
}

/// Checks `configstr` as targetcli sends it (`<subtype>/<cfgstring>`) for
/// the handler `subtype`: `(is_valid, message)`, message "success" when
/// valid, as tcmu-runner answers.
pub fn check(subtype: &str, configstr: &str) -> (bool, String) {
    let Some(cfg) = configstr
        .strip_prefix(subtype)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return (
            false,
            format!("config string {configstr:?} does not start with \"{subtype}/\""),
        );
    };
    match backends::check_config(subtype, cfg) {
        Ok(()) => (true, "success".into()),
        Err(m) => (false, m),
    }
}

struct Handler {
    desc: HandlerDesc,
    changer: Option<Arc<dyn MediumChanger>>,
}

/// A value computed on a thread of its own, awaited without blocking
/// zbus's executor: a CheckConfig on rbd connects to the cluster, which
/// can take seconds, and must not stall every other D-Bus call.
struct Blocking<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

/// The value once computed, and who to wake for it.
type Slot<T> = (Option<T>, Option<Waker>);

impl<T> Future for Blocking<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Blocking<Result<T, String>> {
    let slot = Arc::new(Mutex::new((None, None)));
    let put = {
        let slot = slot.clone();
        move |v: Result<T, String>| {
            let mut s: std::sync::MutexGuard<'_, Slot<Result<T, String>>> =
                slot.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = Some(v);
            if let Some(w) = s.1.take() {
                w.wake();
            }
        }
    };
    let put2 = put.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("dbus-{what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|_| format!("{what} failed inside the daemon"));
            put(r);
        });
    if let Err(e) = spawned {
        put2(Err(format!("{what}: cannot start a thread: {e}")));
    }
    Blocking { slot }
}

#[zbus::interface(name = "org.kernel.TCMUService1")]
impl Handler {
    /// What the config string holds.
    #[zbus(property)]
    fn config_desc(&self) -> String {
        self.desc.config_desc.to_string()
    }

    /// Validates a config string before a backstore is created.
    #[zbus(out_args("is_valid", "message"))]
    async fn check_config(&self, configstr: String) -> (bool, String) {
        let sub = self.desc.subtype;
        let cfg = configstr.clone();
        let (ok, msg) = blocking("CheckConfig", move || check(sub, &cfg))
            .await
            .unwrap_or_else(|m| (false, m));
        tracing::info!(handler = sub, config = %configstr, valid = ok, message = %msg, "CheckConfig");
        (ok, msg)
    }

    /// Points an existing backstore at another image/file and size.
    #[zbus(out_args("ret", "message"))]
    async fn change_medium(&self, name: String, size: u64, configstr: String) -> (i32, String) {
        let sub = self.desc.subtype;
        let Some(changer) = self.changer.clone() else {
            return (-libc::EOPNOTSUPP, "medium changes are not served".into());
        };
        blocking("ChangeMedium", move || {
            let (ok, msg) = check(sub, &configstr);
            if !ok {
                return (-libc::EINVAL, msg);
            }
            let cfg = &configstr[sub.len() + 1..];
            match changer.change_medium(&name, size, sub, cfg) {
                Ok(()) => (0, "success".to_string()),
                Err((e, m)) => (e, m),
            }
        })
        .await
        .unwrap_or_else(|m| (-libc::EIO, m))
    }
}

type Managed = HashMap<OwnedObjectPath, HashMap<String, HashMap<String, OwnedValue>>>;

struct Manager {
    objects: Vec<(OwnedObjectPath, String)>,
}

#[zbus::interface(name = "org.freedesktop.DBus.ObjectManager")]
impl Manager {
    /// Every handler object with its interface and properties.
    fn get_managed_objects(&self) -> zbus::fdo::Result<Managed> {
        let mut out = Managed::new();
        for (path, desc) in &self.objects {
            let v = OwnedValue::try_from(Value::from(desc.as_str()))
                .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
            let props = HashMap::from([("ConfigDesc".to_string(), v)]);
            out.insert(path.clone(), HashMap::from([(IFACE.to_string(), props)]));
        }
        Ok(out)
    }
}

struct HandlerManager;

#[zbus::interface(name = "org.kernel.TCMUService1.HandlerManager1")]
impl HandlerManager {
    /// tcmu-runner lets separate processes register D-Bus handlers; this
    /// daemon serves its own handlers only and says so.
    #[zbus(out_args("succeeded", "message"))]
    fn register_handler(&self, subtype: &str, cfgstr_desc: &str) -> (bool, String) {
        let _ = cfgstr_desc;
        (
            false,
            format!("tcmu-rbd does not take external handlers (asked for {subtype:?})"),
        )
    }
}

/// Which bus to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    /// The system bus (production).
    System,
    /// A bus at this address (tests: a private dbus-daemon).
    Address(String),
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// The bus is unreachable or refused us.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    /// Someone else (tcmu-runner?) owns the name.
    #[error("{BUS_NAME} is owned by another process (is tcmu-runner running?)")]
    NameTaken,
}

fn path(p: &str) -> Result<OwnedObjectPath, DbusError> {
    OwnedObjectPath::try_from(p).map_err(|e| DbusError::Bus(e.into()))
}

/// Connects, exports the handlers and takes the bus name. The service
/// runs on zbus's own thread for as long as the returned connection
/// lives.
pub fn serve(
    bus: &Bus,
    handlers: &[HandlerDesc],
    changer: Option<Arc<dyn MediumChanger>>,
) -> Result<zbus::blocking::Connection, DbusError> {
    let b = match bus {
        Bus::System => zbus::blocking::connection::Builder::system()?,
        Bus::Address(a) => zbus::blocking::connection::Builder::address(a.as_str())?,
    };
    // A wedged bus must not keep the daemon from serving its devices.
    let mut b = b.method_timeout(std::time::Duration::from_secs(10));
    let mut objects = Vec::new();
    for h in handlers {
        let p = path(&format!("{ROOT_PATH}/{}", h.subtype))?;
        objects.push((p.clone(), h.config_desc.to_string()));
        b = b.serve_at(
            p,
            Handler {
                desc: h.clone(),
                changer: changer.clone(),
            },
        )?;
    }
    let conn = b
        .serve_at(ROOT_PATH, Manager { objects })?
        .serve_at(HANDLER_MANAGER_PATH, HandlerManager)?
        .build()?;
    use zbus::fdo::{RequestNameFlags, RequestNameReply};
    match conn.request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into()) {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => Ok(conn),
        Ok(RequestNameReply::Exists | RequestNameReply::InQueue) | Err(zbus::Error::NameTaken) => {
            Err(DbusError::NameTaken)
        }
        Err(e) => Err(e.into()),
    }
}

/// Keeps the service on the bus for the life of the process, on a thread
/// of its own so a wedged bus never holds up the daemon: every `every` it
/// checks the connection with a call to the bus itself, and when the
/// connection is gone (dbus-daemon restarted) or was never made (no bus at
/// start), it connects and registers again. `up` says whether the service
/// is registered now (for status output).
pub fn supervise(
    bus: Bus,
    handlers: Vec<HandlerDesc>,
    changer: Option<Arc<dyn MediumChanger>>,
    first: Option<zbus::blocking::Connection>,
    up: Arc<std::sync::atomic::AtomicBool>,
    every: std::time::Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("tcmu-dbus".into())
        .spawn(move || {
            let mut conn = first;
            let mut last_err = String::new();
            loop {
                std::thread::sleep(every);
                if let Some(c) = &conn {
                    let alive = zbus::blocking::fdo::DBusProxy::new(c)
                        .map_err(|e| e.to_string())
                        .and_then(|p| p.get_id().map_err(|e| e.to_string()));
                    if let Err(e) = alive {
                        tracing::warn!(error = %e, "D-Bus connection lost; registering again when the bus is back");
                        conn = None;
                        up.store(false, Ordering::Relaxed);
                    }
                    continue;
                }
                match serve(&bus, &handlers, changer.clone()) {
                    Ok(c) => {
                        tracing::info!(name = BUS_NAME, "D-Bus service registered");
                        conn = Some(c);
                        up.store(true, Ordering::Relaxed);
                        last_err.clear();
                    }
                    Err(e) => {
                        // Said once per distinct failure, not every turn.
                        let msg = e.to_string();
                        if msg != last_err {
                            tracing::warn!(error = %msg, "D-Bus registration failed; retrying");
                            last_err = msg;
                        }
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_wants_the_subtype_prefix_targetcli_sends() {
        assert_eq!(check("ram", "ram/anything"), (true, "success".into()));
        assert_eq!(check("ram", "ram/"), (true, "success".into()));
        let (ok, msg) = check("ram", "anything");
        assert!(!ok);
        assert!(msg.contains("\"ram/\""), "{msg}");
        let (ok, msg) = check("file", "file/relative/path");
        assert!(!ok);
        assert!(msg.contains("not an absolute path"), "{msg}");
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("lun0.img");
        let (ok, msg) = check("file", &format!("file/{}", f.display()));
        assert!(ok, "{msg}");
        // A directory is no LUN.
        let (ok, _) = check("file", &format!("file/{}", t.path().display()));
        assert!(!ok);
    }
}
