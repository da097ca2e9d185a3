//! The few syscalls pinning needs that aya 0.14 does not expose: the filesystem type of the
//! pin directory, its lock, and an XDP link's interface.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `BPF_FS_MAGIC` (`include/uapi/linux/magic.h`): the `f_type` of a bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The `f_type` of the filesystem `path` is on.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    // SAFETY: statfs is plain data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// `flock` without blocking: `Ok(false)` when another open file description holds a
/// conflicting lock.
pub fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
    // SAFETY: a valid fd owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the XDP member of its union (the kernel fills what fits and
/// wants the rest of what we pass zeroed).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `xdp.ifindex` for an XDP link: 0 once the interface is gone (a defunct link).
    ifindex: u32,
    _rest: [u32; 7],
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live, initialised attribute struct of `size` bytes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    let fd = bpf(BPF_OBJ_GET, (&raw mut attr).cast(), size_of::<ObjGetAttr>())?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a pinned XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkState {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0: the interface it was attached to is gone.
    pub ifindex: u32,
}

/// `BPF_LINK_TYPE_XDP`.
const LINK_TYPE_XDP: u32 = 6;

/// The state of the XDP link pinned at `path`; an error if it is not an XDP link.
pub fn xdp_link(path: &Path) -> io::Result<XdpLinkState> {
    let fd = obj_get(path)?;
    let mut info = LinkInfo::default();
    let mut attr =
        InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of::<LinkInfo>() as u32, info: (&raw mut info) as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, (&raw mut attr).cast(), size_of::<InfoAttr>())?;
    if info.link_type != LINK_TYPE_XDP {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not an XDP link (type {})", info.link_type)));
    }
    Ok(XdpLinkState { link_id: info.id, prog_id: info.prog_id, ifindex: info.ifindex })
}

/// The index of `iface` in this thread's network namespace (0: no such interface).
pub fn ifindex(iface: &str) -> u32 {
    let Ok(c) = CString::new(iface) else { return 0 };
    // SAFETY: valid NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}
