//! The few bpf(2) commands pinning needs that aya 0.14 does not expose: opening a pinned
//! object, reading map/link/program info, updating and detaching a link, walking the
//! kernel's links. Plain syscalls on zeroed `bpf_attr` buffers (the kernel accepts a longer
//! buffer as long as the tail is zero).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// enum bpf_cmd (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_GET_FD_BY_ID: u32 = 30;
const BPF_LINK_GET_NEXT_ID: u32 = 31;
const BPF_LINK_DETACH: u32 = 34;

// enum bpf_link_type.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// statfs f_type of a bpf filesystem.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `union bpf_attr`, as 16 words: more than any command here uses.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 32]);

fn bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: bpf(2) reads (and for some commands writes) at most `size` bytes of `attr`,
    // which we own and which lives across the call; pointers inside it point at buffers the
    // callers keep alive across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_long,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: i64) -> OwnedFd {
    // SAFETY: the commands that return an fd return a fresh one we now own.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn set_u64(attr: &mut Attr, word: usize, value: u64) {
    attr.0[word] = value as u32;
    attr.0[word + 1] = (value >> 32) as u32;
}

/// BPF_OBJ_GET: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut attr = Attr::default();
    set_u64(&mut attr, 0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// BPF_OBJ_GET_INFO_BY_FD into `buf`.
fn info(fd: BorrowedFd<'_>, buf: &mut [u64]) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = fd.as_raw_fd() as u32;
    attr.0[1] = std::mem::size_of_val(buf) as u32;
    set_u64(&mut attr, 2, buf.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// What the kernel says about a map (the head of `struct bpf_map_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub name: String,
}

pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut buf = [0u64; 16];
    info(fd, &mut buf)?;
    let word = |i: usize| (buf[i / 2] >> ((i % 2) * 32)) as u32;
    Ok(MapInfo {
        map_type: word(0),
        id: word(1),
        key_size: word(2),
        value_size: word(3),
        max_entries: word(4),
        flags: word(5),
        name: c_name(&buf, 24),
    })
}

/// A NUL-terminated name of up to 16 bytes at byte `offset` of an info buffer.
fn c_name(buf: &[u64], offset: usize) -> String {
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let name = &bytes[offset..(offset + 16).min(bytes.len())];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// The number of keys in a map (BPF_MAP_GET_NEXT_KEY until the end), for hash, LRU and
/// LPM maps; entries that come and go meanwhile may or may not count.
pub fn count_keys(fd: BorrowedFd<'_>, key_size: u32) -> io::Result<u64> {
    let size = key_size.max(1) as usize;
    let mut key = vec![0u8; size];
    let mut next = vec![0u8; size];
    let mut count = 0u64;
    let mut first = true;
    loop {
        let mut attr = Attr::default();
        attr.0[0] = fd.as_raw_fd() as u32;
        // No key: the kernel starts from the first one.
        set_u64(&mut attr, 2, if first { 0 } else { key.as_ptr() as u64 });
        set_u64(&mut attr, 4, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                first = false;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e),
        }
    }
}

/// What a link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by id (the inode number of its directory).
    Cgroup {
        cgroup_id: u64,
        attach_type: u32,
    },
    /// A TCX link on an interface; ifindex 0 once the interface is gone.
    Tcx {
        ifindex: u32,
        attach_type: u32,
    },
    Other {
        link_type: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub target: LinkTarget,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut buf = [0u64; 16];
    info(fd, &mut buf)?;
    let word = |i: usize| (buf[i / 2] >> ((i % 2) * 32)) as u32;
    let link_type = word(0);
    // The union starts at byte 16 (it holds u64s).
    let target = match link_type {
        BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup {
            cgroup_id: buf[2],
            attach_type: word(6),
        },
        BPF_LINK_TYPE_TCX => LinkTarget::Tcx {
            ifindex: word(4),
            attach_type: word(5),
        },
        other => LinkTarget::Other { link_type: other },
    };
    Ok(LinkInfo {
        id: word(1),
        prog_id: word(2),
        target,
    })
}

/// The name of the program with id `prog_id` (its first 15 bytes).
pub fn prog_name(prog_id: u32) -> io::Result<String> {
    let mut attr = Attr::default();
    attr.0[0] = prog_id;
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned_fd)?;
    let mut buf = [0u64; 32];
    info(fd_ref(&fd), &mut buf)?;
    // struct bpf_prog_info: name[16] at byte 64.
    Ok(c_name(&buf, 64))
}

fn fd_ref(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

/// BPF_LINK_UPDATE: the link runs `prog` from now on, atomically (no moment without a
/// program, none with two).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = link.as_raw_fd() as u32;
    attr.0[1] = prog.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// BPF_LINK_DETACH: detaches the link's program now, whoever else holds the link.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Every link in the kernel, opened (links that vanish meanwhile are skipped).
pub fn all_links() -> Vec<OwnedFd> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = Attr::default();
        attr.0[0] = id;
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr).is_err() {
            return out;
        }
        id = attr.0[1];
        let mut attr = Attr::default();
        attr.0[0] = id;
        if let Ok(fd) = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned_fd) {
            out.push(fd);
        }
    }
}

/// The statfs type of the filesystem holding `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: statfs writes into a zeroed struct we own; `c` outlives the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

/// Mounts a bpf filesystem at `path`.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let source = c"bpf";
    let data = c"mode=0700";
    // SAFETY: all pointers are NUL-terminated strings alive across the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
