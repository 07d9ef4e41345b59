//! The rbd handler's config string, as tcmu-runner's rbd handler accepts it:
//! `pool/image` or `pool/namespace/image`, then options separated by `;`:
//! `osd_op_timeout=SECONDS`, `conf=PATH` (a ceph.conf), `id=NAME` (the
//! cephx user, without `client.`). tcmu-rbd adds `merge_kb=KIB`: the most
//! a read or write merged from adjacent commands may carry (default 4096,
//! 0 sends every command on its own; see `Backend::merge_limit`).
//!
//! Unlike tcmu-runner, an unknown or repeated option is an error rather than
//! silently ignored: a typo would otherwise change which cluster or user is
//! used without a word.

use std::path::PathBuf;
use std::time::Duration;

/// A parsed config string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdConfig {
    /// RADOS pool.
    pub pool: String,
    /// RBD namespace inside the pool, if any.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// `osd_op_timeout`: how long an OSD or monitor operation may take
    /// before it fails with ETIMEDOUT.
    pub osd_op_timeout: Option<Duration>,
    /// `conf`: the ceph.conf to read (else librados' default search).
    pub conf: Option<PathBuf>,
    /// `id`: the cephx user (else `admin`).
    pub id: Option<String>,
    /// `merge_kb`: the merge limit in KiB (else [`super::MERGE_LIMIT`]).
    pub merge_kb: Option<u32>,
}

impl RbdConfig {
    /// `pool/[namespace/]image`.
    pub fn image_spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{}/{}", self.pool, ns, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// The format, for error messages and targetcli's help.
pub const CONFIG_DESC: &str =
    "pool/[namespace/]image[;osd_op_timeout=SECONDS][;conf=PATH][;id=USER][;merge_kb=KIB]";

/// The largest `merge_kb`: 64 MiB.
pub const MAX_MERGE_KB: u32 = 65536;

fn bad(msg: impl std::fmt::Display) -> String {
    format!("rbd: {msg} (expected {CONFIG_DESC})")
}

/// Names RADOS and RBD accept: no `/`, `;`, `@` or control characters.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(bad(format!("missing {what} name")));
    }
    if let Some(c) = s.chars().find(|c| c.is_control() || *c == '@') {
        return Err(bad(format!("{what} name {s:?} contains {c:?}")));
    }
    Ok(())
}

/// Parses a config string; the error names the fault.
pub fn parse(cfgstring: &str) -> Result<RbdConfig, String> {
    let mut parts = cfgstring.split(';');
    let spec = parts.next().unwrap_or_default();
    if spec.trim().is_empty() {
        return Err(bad("empty config string: missing pool and image"));
    }
    let names: Vec<&str> = spec.split('/').collect();
    let (pool, namespace, image) = match names.as_slice() {
        [image] => {
            return Err(bad(format!(
                "missing pool name: {image:?} has no '/' between pool and image"
            )))
        }
        [pool, image] => (*pool, None, *image),
        [pool, ns, image] => {
            check_name("namespace", ns)?;
            (*pool, Some(ns.to_string()), *image)
        }
        _ => {
            return Err(bad(format!(
                "{spec:?} has {} '/'-separated parts, at most 3 (pool/namespace/image)",
                names.len()
            )))
        }
    };
    check_name("pool", pool)?;
    check_name("image", image)?;
    let mut cfg = RbdConfig {
        pool: pool.to_string(),
        namespace,
        image: image.to_string(),
        osd_op_timeout: None,
        conf: None,
        id: None,
        merge_kb: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for opt in parts {
        if opt.is_empty() {
            // `pool/image;` and `a;;b` as tcmu-runner tolerates them.
            continue;
        }
        let Some((key, val)) = opt.split_once('=') else {
            return Err(bad(format!("option {opt:?} is not key=value")));
        };
        if seen.contains(&key) {
            return Err(bad(format!("option {key} given twice")));
        }
        if val.is_empty() {
            return Err(bad(format!("option {key} has an empty value")));
        }
        match key {
            "osd_op_timeout" => {
                let secs: u64 = val.parse().map_err(|_| {
                    bad(format!(
                        "osd_op_timeout={val:?} is not a whole number of seconds"
                    ))
                })?;
                if secs == 0 {
                    return Err(bad("osd_op_timeout=0: the timeout must be at least 1 s"));
                }
                cfg.osd_op_timeout = Some(Duration::from_secs(secs));
            }
            "conf" => {
                if !val.starts_with('/') {
                    return Err(bad(format!("conf={val:?} is not an absolute path")));
                }
                cfg.conf = Some(PathBuf::from(val));
            }
            "id" => {
                let id = val.strip_prefix("client.").unwrap_or(val);
                check_name("id", id)?;
                cfg.id = Some(id.to_string());
            }
            "merge_kb" => {
                let kb: u32 = val
                    .parse()
                    .ok()
                    .filter(|k| *k <= MAX_MERGE_KB)
                    .ok_or_else(|| {
                        bad(format!(
                            "merge_kb={val:?} is not a whole number of KiB from 0 to {MAX_MERGE_KB}"
                        ))
                    })?;
                cfg.merge_kb = Some(kb);
            }
            other => {
                return Err(bad(format!(
                    "unknown option {other:?} (known: osd_op_timeout, conf, id, merge_kb)"
                )))
            }
        }
        seen.push(key);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_strings() {
        let c = parse("rbd/disk0").unwrap();
        assert_eq!(
            (c.pool.as_str(), c.namespace.as_deref(), c.image.as_str()),
            ("rbd", None, "disk0")
        );
        assert_eq!(c.image_spec(), "rbd/disk0");
        let c = parse("pool/ns1/img;osd_op_timeout=30;conf=/etc/ceph/x.conf;id=tcmu;").unwrap();
        assert_eq!(c.namespace.as_deref(), Some("ns1"));
        assert_eq!(c.image_spec(), "pool/ns1/img");
        assert_eq!(c.osd_op_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.conf, Some(PathBuf::from("/etc/ceph/x.conf")));
        assert_eq!(c.id.as_deref(), Some("tcmu"));
        assert_eq!(parse("p/i;id=client.gw").unwrap().id.as_deref(), Some("gw"));
        assert_eq!(parse("p/i").unwrap().merge_kb, None);
        assert_eq!(parse("p/i;merge_kb=0").unwrap().merge_kb, Some(0));
        assert_eq!(parse("p/i;merge_kb=1024").unwrap().merge_kb, Some(1024));
    }

    #[test]
    fn each_fault_is_named() {
        let cases: &[(&str, &str)] = &[
            ("", "missing pool and image"),
            ("disk0", "missing pool name"),
            ("/disk0", "missing pool name"),
            ("rbd/", "missing image name"),
            ("rbd//img", "missing namespace name"),
            ("a/b/c/d", "at most 3"),
            (
                "rbd/img;osd_op_timeout=abc",
                "osd_op_timeout=\"abc\" is not a whole number",
            ),
            ("rbd/img;osd_op_timeout=0", "at least 1 s"),
            ("rbd/img;osd_op_timeout=", "empty value"),
            ("rbd/img;conf=ceph.conf", "not an absolute path"),
            ("rbd/img;id=", "empty value"),
            ("rbd/img;id=client.", "missing id name"),
            ("rbd/img;bogus=1", "unknown option \"bogus\""),
            (
                "rbd/img;merge_kb=-1",
                "merge_kb=\"-1\" is not a whole number of KiB",
            ),
            ("rbd/img;merge_kb=65537", "from 0 to 65536"),
            ("rbd/img;timeout", "not key=value"),
            ("rbd/img;id=a;id=b", "option id given twice"),
            ("rbd/im@g", "image name \"im@g\" contains '@'"),
        ];
        for (s, want) in cases {
            let e = parse(s).expect_err(s);
            assert!(e.contains(want), "{s:?}: {e:?} does not say {want:?}");
            assert!(e.starts_with("rbd: "), "{e}");
        }
    }
}
