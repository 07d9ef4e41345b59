//! Pins `src/ring/abi.rs` to the kernel's own header: a small C program
//! prints `offsetof`/`sizeof` of every field the ring code uses, from
//! `<linux/target_core_user.h>` as installed (Debian's linux-libc-dev), and
//! each must equal the Rust constant. `scripts/deps.sh` installs the C
//! compiler and the header, so CI always runs it.

use std::process::Command;
use tcmu_rbd::ring::abi;

/// (name, C expression, Rust value)
fn layout() -> Vec<(&'static str, &'static str, usize)> {
    vec![
        (
            "MB_VERSION",
            "offsetof(struct tcmu_mailbox, version)",
            abi::MB_VERSION,
        ),
        (
            "MB_FLAGS",
            "offsetof(struct tcmu_mailbox, flags)",
            abi::MB_FLAGS,
        ),
        (
            "MB_CMDR_OFF",
            "offsetof(struct tcmu_mailbox, cmdr_off)",
            abi::MB_CMDR_OFF,
        ),
        (
            "MB_CMDR_SIZE",
            "offsetof(struct tcmu_mailbox, cmdr_size)",
            abi::MB_CMDR_SIZE,
        ),
        (
            "MB_CMD_HEAD",
            "offsetof(struct tcmu_mailbox, cmd_head)",
            abi::MB_CMD_HEAD,
        ),
        (
            "MB_CMD_TAIL",
            "offsetof(struct tcmu_mailbox, cmd_tail)",
            abi::MB_CMD_TAIL,
        ),
        ("MB_SIZE", "sizeof(struct tcmu_mailbox)", abi::MB_SIZE),
        (
            "MAILBOX_VERSION",
            "TCMU_MAILBOX_VERSION",
            abi::MAILBOX_VERSION as usize,
        ),
        (
            "FLAG_CAP_OOOC",
            "TCMU_MAILBOX_FLAG_CAP_OOOC",
            abi::FLAG_CAP_OOOC as usize,
        ),
        (
            "FLAG_CAP_READ_LEN",
            "TCMU_MAILBOX_FLAG_CAP_READ_LEN",
            abi::FLAG_CAP_READ_LEN as usize,
        ),
        (
            "FLAG_CAP_TMR",
            "TCMU_MAILBOX_FLAG_CAP_TMR",
            abi::FLAG_CAP_TMR as usize,
        ),
        (
            "FLAG_CAP_KEEP_BUF",
            "TCMU_MAILBOX_FLAG_CAP_KEEP_BUF",
            abi::FLAG_CAP_KEEP_BUF as usize,
        ),
        ("OP_PAD", "TCMU_OP_PAD", abi::OP_PAD as usize),
        ("OP_CMD", "TCMU_OP_CMD", abi::OP_CMD as usize),
        ("OP_TMR", "TCMU_OP_TMR", abi::OP_TMR as usize),
        ("OP_MASK", "TCMU_OP_MASK", abi::OP_MASK as usize),
        ("OP_ALIGN", "TCMU_OP_ALIGN_SIZE", abi::OP_ALIGN),
        (
            "HDR_LEN_OP",
            "offsetof(struct tcmu_cmd_entry_hdr, len_op)",
            abi::HDR_LEN_OP,
        ),
        (
            "HDR_CMD_ID",
            "offsetof(struct tcmu_cmd_entry_hdr, cmd_id)",
            abi::HDR_CMD_ID,
        ),
        (
            "HDR_KFLAGS",
            "offsetof(struct tcmu_cmd_entry_hdr, kflags)",
            abi::HDR_KFLAGS,
        ),
        (
            "HDR_UFLAGS",
            "offsetof(struct tcmu_cmd_entry_hdr, uflags)",
            abi::HDR_UFLAGS,
        ),
        (
            "HDR_SIZE",
            "sizeof(struct tcmu_cmd_entry_hdr)",
            abi::HDR_SIZE,
        ),
        (
            "UFLAG_UNKNOWN_OP",
            "TCMU_UFLAG_UNKNOWN_OP",
            abi::UFLAG_UNKNOWN_OP as usize,
        ),
        (
            "UFLAG_READ_LEN",
            "TCMU_UFLAG_READ_LEN",
            abi::UFLAG_READ_LEN as usize,
        ),
        (
            "UFLAG_KEEP_BUF",
            "TCMU_UFLAG_KEEP_BUF",
            abi::UFLAG_KEEP_BUF as usize,
        ),
        (
            "REQ_IOV_CNT",
            "offsetof(struct tcmu_cmd_entry, req.iov_cnt)",
            abi::REQ_IOV_CNT,
        ),
        (
            "REQ_IOV_BIDI_CNT",
            "offsetof(struct tcmu_cmd_entry, req.iov_bidi_cnt)",
            abi::REQ_IOV_BIDI_CNT,
        ),
        (
            "REQ_IOV_DIF_CNT",
            "offsetof(struct tcmu_cmd_entry, req.iov_dif_cnt)",
            abi::REQ_IOV_DIF_CNT,
        ),
        (
            "REQ_CDB_OFF",
            "offsetof(struct tcmu_cmd_entry, req.cdb_off)",
            abi::REQ_CDB_OFF,
        ),
        (
            "REQ_IOV",
            "offsetof(struct tcmu_cmd_entry, req.iov)",
            abi::REQ_IOV,
        ),
        ("IOVEC_SIZE", "sizeof(struct iovec)", abi::IOVEC_SIZE),
        (
            "RSP_SCSI_STATUS",
            "offsetof(struct tcmu_cmd_entry, rsp.scsi_status)",
            abi::RSP_SCSI_STATUS,
        ),
        (
            "RSP_READ_LEN",
            "offsetof(struct tcmu_cmd_entry, rsp.read_len)",
            abi::RSP_READ_LEN,
        ),
        (
            "RSP_SENSE",
            "offsetof(struct tcmu_cmd_entry, rsp.sense_buffer)",
            abi::RSP_SENSE,
        ),
        (
            "SENSE_BUFFERSIZE",
            "TCMU_SENSE_BUFFERSIZE",
            abi::SENSE_BUFFERSIZE,
        ),
        (
            "CMD_ENTRY_SIZE",
            "sizeof(struct tcmu_cmd_entry)",
            abi::CMD_ENTRY_SIZE,
        ),
        (
            "TMR_TYPE",
            "offsetof(struct tcmu_tmr_entry, tmr_type)",
            abi::TMR_TYPE,
        ),
        (
            "TMR_CMD_CNT",
            "offsetof(struct tcmu_tmr_entry, cmd_cnt)",
            abi::TMR_CMD_CNT,
        ),
        (
            "TMR_CMD_IDS",
            "offsetof(struct tcmu_tmr_entry, cmd_ids)",
            abi::TMR_CMD_IDS,
        ),
        (
            "TMR_ENTRY_SIZE",
            "sizeof(struct tcmu_tmr_entry)",
            abi::TMR_ENTRY_SIZE,
        ),
    ]
}

#[test]
fn ring_layout_matches_the_kernel_header() {
    const HEADER: &str = "/usr/include/linux/target_core_user.h";
    if !std::path::Path::new(HEADER).exists() {
        // Loud: the layout is then unchecked on this machine.
        eprintln!("SKIPPED ring_layout_matches_the_kernel_header: {HEADER} missing (install linux-libc-dev)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/target_core_user.h>\nint main(void) {\n",
    );
    for (name, expr, _) in layout() {
        c += &format!("    printf(\"{name} %zu\\n\", (size_t)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    std::fs::write(&src, c).expect("write C");
    let cc = Command::new("cc")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run cc (build-essential)");
    assert!(
        cc.status.success(),
        "the layout program did not compile against {HEADER}: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().expect("run the layout program");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut checked = 0;
    for ((name, expr, rust), line) in layout().into_iter().zip(text.lines()) {
        let (n, v) = line.split_once(' ').expect("NAME VALUE");
        assert_eq!(n, name);
        let c: usize = v.parse().expect("a number");
        assert_eq!(rust, c, "abi::{name} is {rust}, the header's {expr} is {c}");
        checked += 1;
    }
    assert_eq!(
        checked,
        layout().len(),
        "the program printed {checked} lines"
    );
}
