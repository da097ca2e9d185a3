//! Raw `bpf(2)` for the bench's own small programs: the trivial XDP program (the floor), the
//! source-cycling harness that runs another program over many distinct sources, and handles
//! on programs pinned by other tools (xdp-filter), all run through `BPF_PROG_TEST_RUN`.
//!
//! The programs are a handful of instructions written out here, so the floor and the harness
//! need no toolchain and contain nothing the measurement does not account for.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `expected_attach_type` of an XDP program attached to an interface, as aya and libbpf load
/// theirs: a tail call only reaches programs loaded the same way.
const BPF_XDP: u32 = 37;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`; the kernel requires
/// every byte past the fields it knows to be zero, which `Default` guarantees.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (the `test` member).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to `map_name`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (XDP: no target-specific part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised repr(C) bpf_attr prefix and its size is passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new fd that nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A few eBPF instruction encodings (`struct bpf_insn`: u8 code, u8 dst:4|src:4, i16 off,
/// i32 imm, little endian).
mod insn {
    pub fn raw(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | (u64::from(dst) << 8)
            | (u64::from(src) << 12)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    }
    pub fn mov_reg(dst: u8, src: u8) -> u64 {
        raw(0xbf, dst, src, 0, 0)
    }
    pub fn mov_imm(dst: u8, imm: i32) -> u64 {
        raw(0xb7, dst, 0, 0, imm)
    }
    pub fn add_imm(dst: u8, imm: i32) -> u64 {
        raw(0x07, dst, 0, 0, imm)
    }
    pub fn mul_imm(dst: u8, imm: i32) -> u64 {
        raw(0x27, dst, 0, 0, imm)
    }
    pub fn mod_imm(dst: u8, imm: i32) -> u64 {
        raw(0x97, dst, 0, 0, imm)
    }
    /// `dst = htobe32(dst)` (BPF_ALU | BPF_END | BPF_TO_BE, 32 bits).
    pub fn be32(dst: u8) -> u64 {
        raw(0xdc, dst, 0, 0, 32)
    }
    pub fn ldx_w(dst: u8, src: u8, off: i16) -> u64 {
        raw(0x61, dst, src, off, 0)
    }
    pub fn stx_w(dst: u8, src: u8, off: i16) -> u64 {
        raw(0x63, dst, src, off, 0)
    }
    pub fn st_w(dst: u8, off: i16, imm: i32) -> u64 {
        raw(0x62, dst, 0, off, imm)
    }
    /// `if dst > src goto +off`.
    pub fn jgt_reg(dst: u8, src: u8, off: i16) -> u64 {
        raw(0x2d, dst, src, off, 0)
    }
    /// `if dst == imm goto +off`.
    pub fn jeq_imm(dst: u8, imm: i32, off: i16) -> u64 {
        raw(0x15, dst, 0, off, imm)
    }
    pub fn call(helper: i32) -> u64 {
        raw(0x85, 0, 0, 0, helper)
    }
    pub fn exit() -> u64 {
        raw(0x95, 0, 0, 0, 0)
    }
    /// `dst = map` (a 64-bit immediate load of a map fd, two instruction slots).
    pub fn ld_map(dst: u8, map_fd: i32) -> [u64; 2] {
        [raw(0x18, dst, 1, 0, map_fd), 0]
    }
}

fn prog_load(insns: &[u64], name: &str) -> Result<OwnedFd> {
    prog_load_typed(insns, name, BPF_PROG_TYPE_XDP, BPF_XDP)
}

fn prog_load_typed(insns: &[u64], name: &str, prog_type: u32, expected_attach_type: u32) -> Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name16(name),
        expected_attach_type,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD of {name}: {e} (are you root?); verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

fn map_create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, name: &str) -> Result<OwnedFd> {
    let mut attr =
        MapCreateAttr { map_type, key_size, value_size, max_entries, map_name: name16(name), ..Default::default() };
    Ok(owned(bpf(BPF_MAP_CREATE, &mut attr).with_context(|| format!("BPF_MAP_CREATE of {name}"))?))
}

/// Writes one element of the map behind `fd` (key and value in the map's own layout).
pub fn map_update(fd: RawFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr =
        MapElemAttr { map_fd: fd as u32, key: key.as_ptr() as u64, value: value.as_ptr() as u64, ..Default::default() };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

/// Opens a pinned BPF object (program or map).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("pin path with a NUL byte")?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    Ok(owned(bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("BPF_OBJ_GET of {}", path.display()))?))
}

/// Runs program `fd` `repeat` times on `frame`; returns (verdict, kernel mean ns per run).
pub fn test_run(fd: RawFd, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok((attr.retval, Duration::from_nanos(u64::from(attr.duration))))
}

/// An XDP program held by fd: the trivial floor, or one pinned by another tool.
pub struct Prog {
    fd: OwnedFd,
}

impl Prog {
    /// The smallest XDP program: `r0 = XDP_PASS; exit`, nothing in it but the kernel's own
    /// per-run overhead.
    pub fn trivial() -> Result<Self> {
        Ok(Self { fd: prog_load(&[insn::mov_imm(0, 2), insn::exit()], "trivial_xdp")? })
    }

    /// The smallest TC classifier: `r0 = TC_ACT_OK; exit`, the floor of the TC marker's
    /// figures (a test run of a TC program also builds an skb around the frame).
    pub fn trivial_tc() -> Result<Self> {
        Ok(Self {
            fd: prog_load_typed(&[insn::mov_imm(0, 0), insn::exit()], "trivial_tc", BPF_PROG_TYPE_SCHED_CLS, 0)?,
        })
    }

    /// `return bpf_redirect(ifindex, 0)`: sends every frame on to interface `ifindex` (in the
    /// namespace of the interface the program is attached to) as an xdp_frame.
    pub fn redirect(ifindex: u32) -> Result<Self> {
        let p = [insn::mov_imm(1, ifindex as i32), insn::mov_imm(2, 0), insn::call(23), insn::exit()];
        Ok(Self { fd: prog_load(&p, "bench_redirect")? })
    }

    /// Attaches in native (driver) mode to `ifindex` of the calling thread's network
    /// namespace; detached when the returned link is dropped.
    pub fn attach_native(&self, ifindex: u32) -> Result<OwnedFd> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            // XDP_FLAGS_DRV_MODE
            flags: 1 << 2,
        };
        Ok(owned(
            bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching XDP natively to ifindex {ifindex}"))?,
        ))
    }

    pub fn from_pin(path: &Path) -> Result<Self> {
        Ok(Self { fd: obj_get(path)? })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        test_run(self.fd(), frame, repeat)
    }
}

/// The trivial program, the floor of every per-packet figure.
pub type TrivialXdp = Prog;

/// Offset of the IPv4 source address in an untagged Ethernet + IPv4 frame.
const IPV4_SRC_OFFSET: i16 = 14 + 12;

/// A harness that gives every run of `BPF_PROG_TEST_RUN` its own source address, then
/// tail-calls the program under test, so one call with a large repeat touches `count`
/// distinct sources (as many keys in the target's maps) instead of one cache-hot entry.
///
/// Run `i` (counted across calls) rewrites the frame's IPv4 source to
/// `base + (i mod count) * stride`. The IPv4 header checksum is left stale: neither the
/// limiter nor xdp-filter checks it, as the kernel's own XDP programs do not. The harness's
/// own cost (one array lookup, a store, a tail call) is the same whatever it calls, so it
/// cancels when the same harness in front of the trivial program is subtracted.
pub struct Cycler {
    prog: OwnedFd,
    counter: OwnedFd,
    _targets: OwnedFd,
}

impl Cycler {
    pub fn new(target_fd: RawFd, base: Ipv4Addr, count: u32, stride: u32) -> Result<Self> {
        anyhow::ensure!(count >= 1 && count <= i32::MAX as u32, "source count {count} out of range");
        anyhow::ensure!(stride >= 1 && stride <= i32::MAX as u32, "stride {stride} out of range");
        let counter = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "bench_cycle")?;
        let targets = map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "bench_target")?;
        let counter_ld = insn::ld_map(1, counter.as_raw_fd());
        let targets_ld = insn::ld_map(2, targets.as_raw_fd());
        // The base is added as a 32-bit immediate (sign-extended), and only the low 32 bits
        // are stored, so any address works.
        let base = u32::from(base) as i32;
        let mut p: Vec<u64> = vec![
            insn::mov_reg(6, 1),   // r6 = ctx
            insn::st_w(10, -4, 0), // key = 0
            insn::mov_reg(2, 10),
            insn::add_imm(2, -4),
            counter_ld[0],
            counter_ld[1],
            insn::call(1), // bpf_map_lookup_elem
        ];
        let out_from = |at: usize, out: usize| (out - at - 1) as i16;
        // Index of the `out:` label, counted below.
        const OUT: usize = 27;
        p.push(insn::jeq_imm(0, 0, out_from(p.len(), OUT)));
        p.extend([
            insn::ldx_w(7, 0, 0), // r7 = i
            insn::mov_reg(8, 7),
            insn::add_imm(8, 1),
            insn::mod_imm(8, count as i32),
            insn::stx_w(0, 8, 0), // counter = (i + 1) % count
            insn::mul_imm(7, stride as i32),
            insn::add_imm(7, base),
            insn::be32(7),
            insn::ldx_w(2, 6, 0), // data
            insn::ldx_w(3, 6, 4), // data_end
            insn::mov_reg(4, 2),
            insn::add_imm(4, i32::from(IPV4_SRC_OFFSET) + 4),
        ]);
        p.push(insn::jgt_reg(4, 3, out_from(p.len(), OUT)));
        p.extend([
            insn::stx_w(2, 7, IPV4_SRC_OFFSET),
            insn::mov_reg(1, 6),
            targets_ld[0],
            targets_ld[1],
            insn::mov_imm(3, 0),
            insn::call(12), // bpf_tail_call
        ]);
        assert_eq!(p.len(), OUT, "harness label moved");
        // out: the tail call failed or the frame is too short.
        p.extend([insn::mov_imm(0, 0), insn::exit()]);
        let prog = prog_load(&p, "bench_cycle")?;
        map_update(targets.as_raw_fd(), &0u32.to_ne_bytes(), &(target_fd as u32).to_ne_bytes())
            .context("putting the program under test behind the harness (tail call refused?)")?;
        Ok(Self { prog, counter, _targets: targets })
    }

    /// Starts the next run at source number `i`.
    pub fn set_next(&self, i: u32) -> Result<()> {
        map_update(self.counter.as_raw_fd(), &0u32.to_ne_bytes(), &i.to_ne_bytes())
    }

    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        test_run(self.prog.as_raw_fd(), frame, repeat)
    }
}
