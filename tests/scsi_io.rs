//! The data path of the SCSI core against SBC-3: READ/WRITE of every
//! size, FUA, range and limit checks, short buffers, WRITE AND VERIFY,
//! VERIFY, SYNCHRONIZE CACHE, UNMAP, WRITE SAME, COMPARE AND WRITE, and
//! the capacity unit attention after a resize.

mod scsi_util;

use scsi_util::*;
use tcmu_handler::{Backend, Caps, Geometry, IoBufs, Op};
use tcmu_rbd::scsi::{Lun, LunInfo, Outcome};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn read_write_every_size() {
    let mut t = T::new(1 << 17);
    let data = pattern(2 * 512, 1);
    // WRITE(6) at LBA 0x1_0203 (21-bit LBA), READ(6) back.
    t.good(&[0x0a, 0x01, 0x02, 0x03, 2, 0], &data);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 0x1_0203 * 512,
            len: 1024,
            fua: false
        }]
    );
    let (r, d) = t.din(&[0x08, 0x01, 0x02, 0x03, 2, 0], 1024);
    assert_eq!(r.status, 0);
    assert_eq!(d, data);
    t.ops();
    // WRITE(12) / READ(12).
    let w12 = [0xaa, 0, 0, 0, 0, 10, 0, 0, 0, 2, 0, 0];
    t.good(&w12, &data);
    let r12 = [0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 2, 0, 0];
    assert_eq!(t.good_in(&r12, 1024), data);
    // WRITE(10) / READ(10).
    t.good(&rw10(0x2a, 0, 20, 2), &data);
    assert_eq!(t.good_in(&rw10(0x28, 0, 20, 2), 1024), data);
    assert_eq!(t.read(20, 2), data);
    t.ops();
    // Transfer length 0 moves nothing and is not an error.
    t.good(&rw10(0x28, 0, 5, 0), &[]);
    assert!(t.ops().is_empty());
}

#[test]
fn read6_length_zero_means_256_blocks() {
    let mut t = T::new(4096);
    // 256 blocks exceeds the 64-block maximum transfer: refused, pointing
    // at the TRANSFER LENGTH byte.
    let s = t.sense(&[0x08, 0, 0, 0, 0, 0], vec![0; 256 * 512]);
    assert_field(&s, true, 4, Some(7));
}

#[test]
fn fua_reaches_the_backend() {
    let mut t = T::new(4096);
    t.good(&rw10(0x2a, 0x08, 1, 1), &[7u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 512,
            len: 512,
            fua: true
        }]
    );
    let mut c = rw16(true, 2, 1);
    c[1] = 0x08;
    t.good(&c, &[7u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 1024,
            len: 512,
            fua: true
        }]
    );
    // WRITE AND VERIFY(10/16) are FUA writes.
    t.good(&rw10(0x2e, 0x02, 3, 1), &[8u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 1536,
            len: 512,
            fua: true
        }]
    );
    let mut c = rw16(true, 4, 1);
    c[0] = 0x8e;
    t.good(&c, &[9u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 2048,
            len: 512,
            fua: true
        }]
    );
    assert_eq!(t.read(4, 1), vec![9u8; 512]);
}

#[test]
fn range_limit_and_buffer_checks() {
    let mut t = T::new(1000);
    // Last block is fine, one past is LBA OUT OF RANGE.
    t.good(&rw16(true, 999, 1), &[1u8; 512]);
    let s = t.sense(&rw16(true, 999, 2), vec![0; 1024]);
    assert_sense(&s, 5, 0x21, 0);
    let s = t.sense(&rw16(false, u64::MAX, 1), vec![0; 512]);
    assert_sense(&s, 5, 0x21, 0);
    let s = t.sense(&rw10(0x28, 0, 1000, 1), vec![0; 512]);
    assert_sense(&s, 5, 0x21, 0);
    // More than MAXIMUM TRANSFER LENGTH (64): INVALID FIELD IN CDB at the
    // transfer length field (byte 10 of a 16-byte CDB, byte 7 of 10).
    let s = t.sense(&rw16(false, 0, 65), vec![0; 65 * 512]);
    assert_field(&s, true, 10, Some(7));
    let s = t.sense(&rw10(0x2a, 0, 0, 65), vec![0; 65 * 512]);
    assert_field(&s, true, 7, Some(7));
    // A data buffer shorter than the transfer: refused, never touched.
    let s = t.sense(&rw16(true, 0, 4), vec![0; 3 * 512]);
    assert_field(&s, true, 10, Some(7));
    let s = t.sense(&rw10(0x28, 0, 0, 2), vec![0; 100]);
    assert_field(&s, true, 7, Some(7));
    assert!(t
        .ops()
        .iter()
        .all(|o| matches!(o, Rec::Write { off: 511_488, .. })));
    // RDPROTECT / WRPROTECT: no protection information.
    let s = t.sense(&rw10(0x28, 0x20, 0, 1), vec![0; 512]);
    assert_field(&s, true, 1, Some(7));
    // A 10-byte opcode in a 6-byte CDB.
    let s = t.sense(&[0x28, 0, 0, 0, 0, 0], vec![0; 512]);
    assert_sense(&s, 5, 0x24, 0);
}

#[test]
fn verify_bytchk_modes() {
    let mut t = T::new(1000);
    let data = pattern(4 * 512, 3);
    t.write(10, &data);
    let verify10 = |flags: u8, lba: u32, n: u16| {
        let mut c = rw10(0x2f, flags, lba, n);
        c[0] = 0x2f;
        c
    };
    // BYTCHK 0: range check only, no data, no backend operation.
    t.good(&verify10(0, 10, 4), &[]);
    assert!(t.ops().is_empty());
    let s = t.sense(&verify10(0, 999, 2), vec![]);
    assert_sense(&s, 5, 0x21, 0);
    // BYTCHK 01b: equal data is GOOD after a read of the media.
    t.good(&verify10(0x02, 10, 4), &data);
    assert_eq!(
        t.ops(),
        vec![Rec::Read {
            off: 5120,
            len: 2048
        }]
    );
    // A difference at byte 1000 of the data-out buffer: MISCOMPARE with
    // INFORMATION = 1000.
    let mut bad = data.clone();
    bad[1000] ^= 0xff;
    let s = t.sense(&verify10(0x02, 10, 4), bad);
    assert_sense(&s, 0x0e, 0x1d, 0x00);
    assert_eq!(s[0] & 0x80, 0x80, "VALID");
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 1000);
    // BYTCHK 11b: one block compared with every block.
    t.write(100, &[0x5au8; 3 * 512]);
    let mut c16 = rw16(false, 100, 3);
    c16[0] = 0x8f;
    c16[1] = 0x06;
    t.good(&c16, &[0x5au8; 512]);
    let mut other = vec![0x5au8; 512];
    other[7] = 0;
    let s = t.sense(&c16, other);
    assert_sense(&s, 0x0e, 0x1d, 0x00);
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 7);
    // BYTCHK 10b is reserved; VRPROTECT unsupported.
    let s = t.sense(&verify10(0x04, 10, 1), vec![0; 512]);
    assert_field(&s, true, 1, Some(2));
    let s = t.sense(&verify10(0x22, 10, 1), vec![0; 512]);
    assert_field(&s, true, 1, Some(7));
    // Short data-out buffer.
    let s = t.sense(&verify10(0x02, 10, 4), vec![0; 512]);
    assert_field(&s, true, 7, Some(7));
}

#[test]
fn synchronize_cache() {
    let mut t = T::new(1000);
    t.good(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(t.ops(), vec![Rec::Flush]);
    let mut c = [0u8; 16];
    c[0] = 0x91;
    c[2..10].copy_from_slice(&10u64.to_be_bytes());
    c[10..14].copy_from_slice(&990u32.to_be_bytes());
    t.good(&c, &[]);
    assert_eq!(t.ops(), vec![Rec::Flush]);
    c[10..14].copy_from_slice(&991u32.to_be_bytes());
    let s = t.sense(&c, vec![]);
    assert_sense(&s, 5, 0x21, 0);
    assert!(t.ops().is_empty());
}

fn unmap_cdb(plen: u16) -> [u8; 10] {
    let l = plen.to_be_bytes();
    [0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let bd = (descs.len() * 16) as u16;
    let mut v = Vec::new();
    v.extend_from_slice(&(bd + 6).to_be_bytes());
    v.extend_from_slice(&bd.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for (lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

#[test]
fn unmap_discards_ranges_that_read_back_zero() {
    let mut t = T::new(1000);
    t.write(0, &[0xaau8; 20 * 512]);
    let list = unmap_list(&[(2, 3), (10, 0), (15, 5)]);
    t.good(&unmap_cdb(list.len() as u16), &list);
    // The empty descriptor is skipped.
    assert_eq!(
        t.ops(),
        vec![Rec::Discard(vec![(1024, 1536), (7680, 2560)])]
    );
    let d = t.read(0, 20);
    for (i, blk) in d.chunks(512).enumerate() {
        let zero = (2..5).contains(&i) || (15..20).contains(&i);
        assert!(
            blk.iter().all(|&b| b == if zero { 0 } else { 0xaa }),
            "block {i}"
        );
    }
}

#[test]
fn unmap_parameter_list_edge_cases() {
    let mut t = T::new(1000);
    // Length 0: nothing to do.
    t.good(&unmap_cdb(0), &[]);
    // 1..7: PARAMETER LIST LENGTH ERROR.
    for n in 1..8u16 {
        let s = t.sense(&unmap_cdb(n), vec![0; usize::from(n)]);
        assert_sense(&s, 5, 0x1a, 0);
    }
    // Header only, no descriptors.
    t.good(&unmap_cdb(8), &unmap_list(&[]));
    // BLOCK DESCRIPTOR DATA LENGTH claims more than the list holds.
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&32u16.to_be_bytes());
    let s = t.sense(&unmap_cdb(l.len() as u16), l);
    assert_sense(&s, 5, 0x1a, 0);
    // The buffer is shorter than the parameter list length.
    let l = unmap_list(&[(0, 1)]);
    let s = t.sense(&unmap_cdb(40), l);
    assert_sense(&s, 5, 0x1a, 0);
    // A partial trailing descriptor is ignored.
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&20u16.to_be_bytes());
    l.extend_from_slice(&[0xff; 4]);
    t.good(&unmap_cdb(l.len() as u16), &l);
    assert_eq!(t.ops(), vec![Rec::Discard(vec![(0, 512)])]);
    // Past the end of the LUN, and overflowing.
    let l = unmap_list(&[(0, 1), (998, 3)]);
    let s = t.sense(&unmap_cdb(l.len() as u16), l);
    assert_sense(&s, 5, 0x21, 0);
    let l = unmap_list(&[(u64::MAX, 2)]);
    let s = t.sense(&unmap_cdb(l.len() as u16), l);
    assert_sense(&s, 5, 0x21, 0);
    assert!(t.ops().is_empty(), "nothing discarded on a refused list");
    // More descriptors than MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (256).
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let l = unmap_list(&many);
    let s = t.sense(&unmap_cdb(l.len() as u16), l);
    assert_field(&s, false, 2, Some(7));
    // ANCHOR.
    let mut c = unmap_cdb(24);
    c[1] = 1;
    let s = t.sense(&c, unmap_list(&[(0, 1)]));
    assert_field(&s, true, 1, Some(0));
}

#[test]
fn unmap_total_is_held_to_the_lba_count_limit() {
    // 4 GiB of 512-byte blocks: MAXIMUM UNMAP LBA COUNT is 2^21. Run on
    // the LUN alone (the ram backend would zero 1 GiB).
    let mut lun = Lun::new(LunInfo {
        geometry: Geometry {
            size: 1 << 32,
            block_size: 512,
        },
        ..info(&T::new(8).be.ram, "s")
    });
    let exec = |lun: &mut Lun, l: Vec<u8>| {
        let cdb = unmap_cdb(l.len() as u16);
        lun.execute(&cdb, &IoBufs::from_vec(l))
    };
    let l = unmap_list(&[(0, 1 << 20), (1 << 21, 1 << 20)]);
    match exec(&mut lun, l) {
        Outcome::Submit(Op::Discard { ranges }, _) => {
            assert_eq!(ranges, vec![(0, 1 << 29), (1 << 30, 1 << 29)])
        }
        o => panic!("expected a discard: {o:?}"),
    }
    let l = unmap_list(&[(0, 1 << 20), (1 << 21, (1 << 20) + 1)]);
    let Outcome::Done(r) = exec(&mut lun, l) else {
        panic!("over the limit must be refused");
    };
    // Pointer at the second descriptor's NUMBER OF LOGICAL BLOCKS.
    assert_field(&r.sense.unwrap().to_fixed(), false, 8 + 16 + 8, Some(7));
}

fn ws(sixteen: bool, flags: u8, lba: u64, n: u32) -> Vec<u8> {
    if sixteen {
        let mut c = rw16(true, lba, n).to_vec();
        c[0] = 0x93;
        c[1] = flags;
        c
    } else {
        let mut c = rw10(0x41, flags, lba as u32, n as u16).to_vec();
        c[0] = 0x41;
        c
    }
}

#[test]
fn write_same_maps_to_the_right_operation() {
    let mut t = T::new(1000);
    t.write(0, &[0xeeu8; 40 * 512]);
    // Non-zero pattern: WriteSame of one block over the range.
    let pat = pattern(512, 9);
    t.good(&ws(false, 0, 2, 3), &pat);
    assert_eq!(
        t.ops(),
        vec![Rec::WriteSame {
            off: 1024,
            len: 1536,
            pattern: pat.clone()
        }]
    );
    let d = t.read(2, 3);
    assert!(d.chunks(512).all(|b| b == &pat[..]));
    // UNMAP with a non-zero pattern still writes the pattern.
    t.good(&ws(true, 0x08, 5, 2), &pat);
    assert_eq!(
        t.ops(),
        vec![Rec::WriteSame {
            off: 2560,
            len: 1024,
            pattern: pat.clone()
        }]
    );
    // UNMAP with zeros: WriteZeroes that may deallocate.
    t.good(&ws(true, 0x08, 10, 4), &[0u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::WriteZeroes {
            off: 5120,
            len: 2048,
            unmap: true
        }]
    );
    assert_eq!(t.read(10, 4), vec![0u8; 2048]);
    // Zeros without UNMAP: WriteZeroes that keeps the blocks allocated.
    t.good(&ws(false, 0, 20, 2), &[0u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::WriteZeroes {
            off: 10240,
            len: 1024,
            unmap: false
        }]
    );
    // NDOB (16 only): zeros without a data-out buffer.
    t.good(&ws(true, 0x09, 30, 2), &[]);
    assert_eq!(
        t.ops(),
        vec![Rec::WriteZeroes {
            off: 15360,
            len: 1024,
            unmap: true
        }]
    );
    assert_eq!(t.read(29, 4)[..512], [0xeeu8; 512][..]);
    assert_eq!(t.read(30, 2), vec![0u8; 1024]);
}

#[test]
fn write_same_refusals() {
    let mut t = T::new(1000);
    let blk = vec![1u8; 512];
    // 0 blocks: WSNZ is advertised.
    let s = t.sense(&ws(true, 0, 0, 0), blk.clone());
    assert_field(&s, true, 10, Some(7));
    let s = t.sense(&ws(false, 0, 0, 0), blk.clone());
    assert_field(&s, true, 7, Some(7));
    // Past the end.
    let s = t.sense(&ws(true, 0, 999, 2), blk.clone());
    assert_sense(&s, 5, 0x21, 0);
    // ANCHOR, WRPROTECT, LBDATA/PBDATA, NDOB in the 10-byte CDB.
    let s = t.sense(&ws(true, 0x10, 0, 1), blk.clone());
    assert_field(&s, true, 1, Some(4));
    let s = t.sense(&ws(true, 0x20, 0, 1), blk.clone());
    assert_field(&s, true, 1, Some(7));
    let s = t.sense(&ws(false, 0x02, 0, 1), blk.clone());
    assert_field(&s, true, 1, Some(2));
    let s = t.sense(&ws(false, 0x01, 0, 1), blk.clone());
    assert_field(&s, true, 1, Some(0));
    // Missing data-out block.
    let s = t.sense(&ws(true, 0, 0, 1), vec![1u8; 100]);
    assert_sense(&s, 5, 0x24, 0);
    assert!(t.ops().is_empty());
    // Without discard, UNMAP with zeros is a plain zero write.
    let mut nd = T::with_caps(
        1000,
        Caps {
            discard: false,
            discard_zeroes: false,
            write_cache: false,
            lba_status: false,
        },
    );
    nd.good(&ws(true, 0x08, 0, 2), &[0u8; 512]);
    assert_eq!(
        nd.ops(),
        vec![Rec::WriteZeroes {
            off: 0,
            len: 1024,
            unmap: false
        }]
    );
}

fn caw(lba: u64, n: u8, fua: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

/// SBC-4: a COMPARE AND WRITE longer than the MAXIMUM COMPARE AND WRITE
/// LENGTH the Block Limits page reports ends with ILLEGAL REQUEST /
/// INVALID FIELD IN CDB pointing at NUMBER OF LOGICAL BLOCKS (byte 13),
/// and reaches no backend; one of exactly that length is executed.
#[test]
fn compare_and_write_longer_than_the_block_limits_is_refused() {
    let mut t = T::new(4096);
    let b0 = t.good_in(&[0x12, 1, 0xb0, 0, 64, 0], 64);
    assert_eq!(b0[1], 0xb0);
    let max = b0[5];
    assert!(max >= 1, "MAXIMUM COMPARE AND WRITE LENGTH is 0");
    if max < 255 {
        let n = max + 1;
        let buf = vec![0u8; 2 * usize::from(n) * BS as usize];
        let s = t.sense(&caw(0, n, false), buf);
        assert_sense(&s, 0x05, 0x24, 0x00);
        assert_eq!(s[15] & 0xc7, 0xc7, "SKSV, C/D = CDB, BPV, bit 7: {s:?}");
        assert_eq!(u16::from_be_bytes([s[16], s[17]]), 13, "field pointer");
        assert!(t.ops().is_empty(), "a refused CAW reached the backend");
    }
    let buf = vec![0u8; 2 * usize::from(max) * BS as usize];
    t.good(&caw(0, max, false), &buf);
    assert_eq!(
        t.ops(),
        vec![Rec::Caw {
            off: 0,
            len: u64::from(max) * BS
        }]
    );
}

#[test]
fn compare_and_write() {
    let mut t = T::new(1000);
    let old = pattern(1024, 1);
    let new = pattern(1024, 2);
    t.write(50, &old);
    // Matching compare half: written.
    let mut buf = old.clone();
    buf.extend(&new);
    t.good(&caw(50, 2, false), &buf);
    assert_eq!(
        t.ops(),
        vec![Rec::Caw {
            off: 25600,
            len: 1024
        }]
    );
    assert_eq!(t.read(50, 2), new);
    // Now the old data no longer matches: the first difference is byte 0
    // unless the patterns agree there; compute it.
    let first = old.iter().zip(&new).position(|(a, b)| a != b).unwrap();
    let s = t.sense(&caw(50, 2, false), buf.clone());
    assert_sense(&s, 0x0e, 0x1d, 0x00);
    assert_eq!(s[0] & 0x80, 0x80, "VALID");
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]) as usize, first);
    assert_eq!(t.read(50, 2), new, "nothing written on a miscompare");
    // A difference deep in the second block.
    let mut cmp = new.clone();
    cmp[700] ^= 1;
    let mut buf = cmp;
    buf.extend(pattern(1024, 3));
    let s = t.sense(&caw(50, 2, false), buf);
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 700);
    assert_eq!(
        t.ops(),
        vec![Rec::Caw {
            off: 25600,
            len: 1024
        }]
    );
    // FUA: the write is followed by a flush before GOOD.
    let mut buf = new.clone();
    buf.extend(&old);
    t.good(&caw(50, 2, true), &buf);
    assert_eq!(
        t.ops(),
        vec![
            Rec::Caw {
                off: 25600,
                len: 1024
            },
            Rec::Flush
        ]
    );
    // 0 blocks: nothing happens.
    t.good(&caw(50, 0, false), &[]);
    assert!(t.ops().is_empty());
    // Over the advertised maximum (32 here), out of range, short buffer.
    let s = t.sense(&caw(0, 33, false), vec![0; 66 * 512]);
    assert_field(&s, true, 13, Some(7));
    let s = t.sense(&caw(999, 2, false), vec![0; 2048]);
    assert_sense(&s, 5, 0x21, 0);
    let s = t.sense(&caw(0, 2, false), vec![0; 3 * 512]);
    assert_field(&s, true, 13, Some(7));
    assert!(t.ops().is_empty());
}

#[test]
fn write_through_flushes_non_fua_operations() {
    let mut t = T::new(1000);
    // Turn WCE off with MODE SELECT.
    let mut list = vec![0, 0, 0, 0, 0x08, 0x12];
    list.extend([0u8; 18]);
    t.good(&[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    t.good(&ws(true, 0, 0, 2), &[3u8; 512]);
    assert!(matches!(&t.ops()[..], [Rec::WriteSame { .. }, Rec::Flush]));
    let l = unmap_list(&[(0, 1)]);
    t.good(&unmap_cdb(l.len() as u16), &l);
    assert!(matches!(&t.ops()[..], [Rec::Discard(_), Rec::Flush]));
}

#[test]
fn capacity_unit_attention_once_after_resize() {
    let mut t = T::new(1000);
    t.lun.set_geometry(Geometry {
        size: 2000 * 512,
        block_size: 512,
    });
    // INQUIRY and REQUEST SENSE-free commands pass without consuming it.
    t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    let s = t.sense(&[0, 0, 0, 0, 0, 0], vec![]);
    assert_sense(&s, 0x06, 0x2a, 0x09);
    // Once only.
    t.good(&[0, 0, 0, 0, 0, 0], &[]);
    let d = t.good_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(&d[..4], &1999u32.to_be_bytes());
    // Setting the same geometry again raises nothing.
    t.lun.set_geometry(Geometry {
        size: 2000 * 512,
        block_size: 512,
    });
    t.good(&[0, 0, 0, 0, 0, 0], &[]);
    // REQUEST SENSE reports and clears a pending one.
    t.lun.set_geometry(Geometry {
        size: 3000 * 512,
        block_size: 512,
    });
    let d = t.good_in(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!((d[2] & 0x0f, d[12], d[13]), (0x06, 0x2a, 0x09));
    t.good(&[0, 0, 0, 0, 0, 0], &[]);
    // The new size is enforced.
    t.be.ram.resize(3000 * 512).unwrap();
    t.write(2999, &[1u8; 512]);
    let s = t.sense(&rw16(true, 3000, 1), vec![0; 512]);
    assert_sense(&s, 5, 0x21, 0);
}

#[test]
fn backend_errors_map_to_sense() {
    use tcmu_handler::IoError;
    let t = T::new(1000);
    let mut lun = Lun::new(info(&*t.be, "s"));
    let bufs = IoBufs::from_vec(vec![0u8; 512]);
    let mut fail = |cdb: &[u8], e: IoError| -> [u8; 18] {
        let Outcome::Submit(_, p) = lun.execute(cdb, &bufs) else {
            panic!("{cdb:02x?} should reach the backend");
        };
        match lun.finish(p, Err(e)) {
            Outcome::Done(r) => {
                assert_eq!(r.status, 2);
                r.sense.unwrap().to_fixed()
            }
            Outcome::Submit(op, _) => panic!("no follow-up after an error: {op:?}"),
            Outcome::Copy(..) => panic!("no copy after an error"),
        }
    };
    let read = rw16(false, 0, 1);
    let write = rw16(true, 0, 1);
    let io = || IoError::Io {
        errno: 5,
        msg: "eio".into(),
    };
    assert_sense(&fail(&read, io()), 0x03, 0x11, 0x00);
    assert_sense(&fail(&write, io()), 0x03, 0x0c, 0x00);
    assert_sense(&fail(&write, IoError::NoSpace), 0x07, 0x27, 0x07);
    assert_sense(&fail(&read, IoError::Timeout), 0x0b, 0x00, 0x00);
    assert_sense(
        &fail(&write, IoError::Fenced("blocklisted".into())),
        0x02,
        0x04,
        0x00,
    );
    assert_sense(&fail(&read, IoError::OutOfRange), 0x05, 0x21, 0x00);
    // A failed flush after a FUA COMPARE AND WRITE is a write error.
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[1] = 0x08;
    c[13] = 1;
    let big = IoBufs::from_vec(vec![0u8; 1024]);
    let Outcome::Submit(_, p) = lun.execute(&c, &big) else {
        panic!("CAW should reach the backend");
    };
    let Outcome::Submit(Op::Flush, p) = lun.finish(p, Ok(())) else {
        panic!("FUA CAW must flush");
    };
    let Outcome::Done(r) = lun.finish(p, Err(io())) else {
        panic!("done after the flush");
    };
    assert_sense(&r.sense.unwrap().to_fixed(), 0x03, 0x0c, 0x00);
}
