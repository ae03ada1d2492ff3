//! A filesystem that models a power cut: it keeps, across a cut, only what
//! was fsynced, names included.
//!
//! The model is POSIX's promise and nothing more:
//! - a file's contents (and size) survive a cut as of its last `fsync` or
//!   `fdatasync`; a file never synced comes back empty;
//! - a directory's entries (new names, renames, removals) survive as of
//!   the directory's last `fsync`; a name that was never made durable is
//!   gone, even if its file was synced, and a removal that was never made
//!   durable is undone.
//!
//! ext4 and xfs usually keep more than that, so what survives here
//! survives there. The model lives in memory and is served through FUSE
//! ([`fuser`], mounted directly, as root); [`PowerCut::cut`] unmounts it,
//! drops everything not durable, and mounts it again, so no page or
//! directory cache of the kernel carries anything across. Whoever calls it
//! must have killed the processes using it first (a cut kills them too).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

#[derive(Clone)]
struct Node {
    dir: bool,
    perm: u16,
    /// A file's bytes.
    data: Vec<u8>,
    /// A directory's entries.
    entries: BTreeMap<OsString, u64>,
    parent: u64,
    mtime: SystemTime,
}

impl Node {
    fn new(dir: bool, perm: u16, parent: u64) -> Node {
        Node { dir, perm, data: Vec::new(), entries: BTreeMap::new(), parent, mtime: SystemTime::now() }
    }
}

/// What the model counted, for a test to show it exercised something.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// `fsync`/`fdatasync` of files.
    pub file_syncs: u64,
    /// `fsync` of directories.
    pub dir_syncs: u64,
    /// Cuts so far.
    pub cuts: u64,
}

#[derive(Default)]
struct Model {
    /// What processes see now.
    live: HashMap<u64, Node>,
    /// What would be read back after a cut: every inode as of its last sync.
    durable: HashMap<u64, Node>,
    next_ino: u64,
    counts: Counts,
}

impl Model {
    fn new() -> Model {
        let root = Node::new(true, 0o755, 1);
        Model { live: HashMap::from([(1, root.clone())]), durable: HashMap::from([(1, root)]), next_ino: 2, counts: Counts::default() }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.live.get(&ino)?;
        let size = if n.dir { 4096 } else { n.data.len() as u64 };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: if n.dir { FileType::Directory } else { FileType::RegularFile },
            perm: n.perm,
            nlink: if n.dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        match self.live.get_mut(&ino) {
            Some(n) if n.dir => Ok(n),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn make(&mut self, parent: u64, name: &OsStr, dir: bool, mode: u32) -> Result<FileAttr, Errno> {
        if self.dir_mut(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = Node::new(dir, (mode & 0o7777) as u16, parent);
        // On disk the inode exists, empty, until something syncs it.
        self.durable.insert(ino, Node { data: Vec::new(), entries: BTreeMap::new(), ..node.clone() });
        self.live.insert(ino, node);
        self.dir_mut(parent)?.entries.insert(name.to_os_string(), ino);
        self.attr(ino).ok_or(Errno::EIO)
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        match self.live.get_mut(&ino) {
            Some(n) if !n.dir => Ok(n),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let live = self.live.get(&ino).ok_or(Errno::ENOENT)?.clone();
        let d = self.durable.entry(ino).or_insert_with(|| live.clone());
        d.perm = live.perm;
        if live.dir {
            d.entries = live.entries;
            self.counts.dir_syncs += 1;
        } else {
            d.data = live.data;
            self.counts.file_syncs += 1;
        }
        Ok(())
    }

    /// The power goes: only what was synced comes back.
    fn cut(&mut self) {
        self.live = self.durable.clone();
        self.counts.cuts += 1;
    }
}

/// Stops the processes using the filesystem at an exact operation: the
/// N-th change (create, write, truncate, rename, removal, sync) is held
/// until [`PowerCut::release`] and then fails, as does every change after
/// it until [`PowerCut::thaw`].
///
/// A process whose request the filesystem has taken cannot die before it
/// is answered (the kernel waits it out), so a test sends SIGKILL, then
/// releases: the process dies on the answer, without running another
/// instruction of its own.
#[derive(Default)]
struct Gate {
    /// Changes since the gate was last armed.
    ops: u64,
    stop_at: Option<u64>,
    /// The stop was reached: changes fail until thawed.
    frozen: bool,
    /// The change that reached it is waiting for its answer.
    held: bool,
}

#[derive(Clone)]
struct Fs(Arc<Mutex<Model>>, Arc<(Mutex<Gate>, Condvar)>);

impl Fs {
    fn model(&self) -> MutexGuard<'_, Model> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called before every change: whether it may happen.
    fn step(&self, what: impl FnOnce() -> String) -> Result<(), Errno> {
        let (lock, cv) = &*self.1;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if g.frozen {
            return Err(Errno::EIO);
        }
        g.ops += 1;
        if std::env::var_os("PIVGATE_POWERCUT_TRACE").is_some() {
            eprintln!("powercut: change {}: {}", g.ops, what());
        }
        if g.stop_at == Some(g.ops) {
            g.frozen = true;
            g.held = true;
            cv.notify_all();
            // Until the test has sent its SIGKILL and releases it; the
            // change never lands.
            while g.held {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

macro_rules! step {
    ($fs:expr, $reply:expr, $what:expr) => {
        if let Err(e) = $fs.step($what) {
            return $reply.error(e);
        }
    };
}

const TTL: Duration = Duration::ZERO;

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let m = self.model();
        let found = m.live.get(&parent.0).and_then(|p| p.entries.get(name)).and_then(|ino| m.attr(*ino));
        match found {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if mode.is_some() || size.is_some() {
            step!(self, reply, || format!("setattr {} size {:?}", ino.0, size));
        }
        let mut m = self.model();
        let Some(n) = m.live.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if let Some(mode) = mode {
            n.perm = (mode & 0o7777) as u16;
        }
        if let Some(size) = size {
            if n.dir {
                return reply.error(Errno::EISDIR);
            }
            n.data.resize(size as usize, 0);
            n.mtime = SystemTime::now();
        }
        match m.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, _rdev: u32, reply: ReplyEntry) {
        step!(self, reply, || format!("mknod {name:?}"));
        if mode & libc_s_ifmt() != libc_s_ifreg() {
            return reply.error(Errno::EPERM);
        }
        match self.model().make(parent.0, name, false, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        step!(self, reply, || format!("mkdir {name:?}"));
        match self.model().make(parent.0, name, true, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, _flags: i32, reply: ReplyCreate) {
        step!(self, reply, || format!("create {name:?}"));
        match self.model().make(parent.0, name, false, mode) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        step!(self, reply, || format!("unlink {name:?}"));
        let mut m = self.model();
        let r = (|| {
            let ino = *m.live.get(&parent.0).and_then(|p| p.entries.get(name)).ok_or(Errno::ENOENT)?;
            if m.live.get(&ino).is_some_and(|n| n.dir) {
                return Err(Errno::EISDIR);
            }
            m.dir_mut(parent.0)?.entries.remove(name);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        step!(self, reply, || format!("rmdir {name:?}"));
        let mut m = self.model();
        let r = (|| {
            let ino = *m.live.get(&parent.0).and_then(|p| p.entries.get(name)).ok_or(Errno::ENOENT)?;
            match m.live.get(&ino) {
                Some(n) if !n.dir => return Err(Errno::ENOTDIR),
                Some(n) if !n.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            m.dir_mut(parent.0)?.entries.remove(name);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        step!(self, reply, || format!("rename {name:?} -> {newname:?}"));
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let mut m = self.model();
        let r = (|| {
            let ino = *m.live.get(&parent.0).and_then(|p| p.entries.get(name)).ok_or(Errno::ENOENT)?;
            let moving_dir = m.live.get(&ino).is_some_and(|n| n.dir);
            if let Some(old) = m.dir_mut(newparent.0)?.entries.get(newname).copied() {
                match m.live.get(&old) {
                    Some(n) if n.dir && !moving_dir => return Err(Errno::EISDIR),
                    Some(n) if !n.dir && moving_dir => return Err(Errno::ENOTDIR),
                    Some(n) if n.dir && !n.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
            }
            m.dir_mut(parent.0)?.entries.remove(name);
            m.dir_mut(newparent.0)?.entries.insert(newname.to_os_string(), ino);
            if let Some(n) = m.live.get_mut(&ino) {
                n.parent = newparent.0;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().live.get(&ino.0) {
            // No page cache: every read and write comes here.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let m = self.model();
        match m.live.get(&ino.0) {
            Some(n) if !n.dir => {
                let start = (offset as usize).min(n.data.len());
                let end = start.saturating_add(size as usize).min(n.data.len());
                reply.data(&n.data[start..end]);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        step!(self, reply, || format!("write {} at {offset} len {}", ino.0, data.len()));
        let mut m = self.model();
        match m.file_mut(ino.0) {
            Ok(n) => {
                let end = offset as usize + data.len();
                if n.data.len() < end {
                    n.data.resize(end, 0);
                }
                n.data[offset as usize..end].copy_from_slice(data);
                n.mtime = SystemTime::now();
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        step!(self, reply, || format!("fsync {}", ino.0));
        match self.model().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let m = self.model();
        let Some(n) = m.live.get(&ino.0).filter(|n| n.dir) else { return reply.error(Errno::ENOTDIR) };
        let mut all = vec![(ino.0, FileType::Directory, OsString::from(".")), (n.parent, FileType::Directory, OsString::from(".."))];
        for (name, child) in &n.entries {
            let kind = if m.live.get(child).is_some_and(|c| c.dir) { FileType::Directory } else { FileType::RegularFile };
            all.push((*child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        step!(self, reply, || format!("fsyncdir {}", ino.0));
        match self.model().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        if self.model().live.contains_key(&ino.0) {
            reply.ok()
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        step!(self, reply, || format!("fallocate {}", ino.0));
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut m = self.model();
        match m.file_mut(ino.0) {
            Ok(n) => {
                let end = (offset + length) as usize;
                if n.data.len() < end {
                    n.data.resize(end, 0);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }
}

// S_IFMT and S_IFREG, without a libc dependency of our own.
const fn libc_s_ifmt() -> u32 {
    0o170000
}
const fn libc_s_ifreg() -> u32 {
    0o100000
}

/// The model, mounted.
pub struct PowerCut {
    fs: Fs,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerCut {
    /// Mounts an empty model at `mountpoint` (created if missing). Needs
    /// root and `/dev/fuse`.
    pub fn mount(mountpoint: &Path) -> Result<PowerCut> {
        std::fs::create_dir_all(mountpoint)?;
        // fusectl, to end a session whose mount another namespace copied
        // (best effort: without it such a session's thread is left).
        let ctl = Path::new("/sys/fs/fuse/connections");
        if ctl.is_dir() && std::fs::read_dir(ctl).map(|mut d| d.next().is_none()).unwrap_or(false) {
            let _ = std::process::Command::new("mount").args(["-t", "fusectl", "fusectl"]).arg(ctl).stderr(std::process::Stdio::null()).status();
        }
        let fs = Fs(Arc::new(Mutex::new(Model::new())), Arc::default());
        let mut p = PowerCut { fs, mountpoint: mountpoint.to_path_buf(), session: None };
        p.attach()?;
        Ok(p)
    }

    fn attach(&mut self) -> Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("pivgate-powercut".into()), fuser::MountOption::RW];
        let s = fuser::spawn_mount(self.fs.clone(), &self.mountpoint, &config)
            .with_context(|| format!("mounting the power-cut model on {} (needs root and /dev/fuse)", self.mountpoint.display()))?;
        self.session = Some(s);
        Ok(())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power goes and comes back: everything not durable is dropped.
    /// Kill every process using the filesystem first.
    pub fn cut(&mut self) -> Result<()> {
        self.thaw();
        self.detach();
        self.fs.model().cut();
        self.attach()
    }

    /// The connection is aborted and the model mounted again, keeping
    /// everything written (not a power cut): a process held in a request
    /// that will never be answered dies then.
    pub fn remount(&mut self) -> Result<()> {
        self.thaw();
        self.detach();
        self.attach()
    }

    /// Reaps `child`, sent SIGKILL while this disk held one of its changes
    /// (and released since). A killed process dies only once each of its
    /// filesystem requests is answered; one that has not died within 5 s
    /// has a request the model never took up, so the connection is aborted
    /// and mounted again ([`PowerCut::remount`]), and the process dies then.
    /// Seen once in some thousand stops: the gateway's threads waiting in
    /// `request_wait_answer` with the model's worker idle.
    pub fn reap(&mut self, child: &mut std::process::Child) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                eprintln!("the killed process is still held by the filesystem after 5 s: aborting the connection");
                self.remount()?;
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Unmounts (lazily) without waiting for the session to end: a mount
    /// namespace made while the model was mounted (the rig's pcscd
    /// restarts under `unshare -m`) holds a copy of the mount, which keeps
    /// the connection open after this one goes. The connection is then
    /// aborted through fusectl, where it is mounted, so the session ends.
    fn detach(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(s) = self.session.take() else { return };
        let dev = std::fs::metadata(&self.mountpoint).map(|m| m.dev()).ok();
        drop(s);
        if let Some(dev) = dev {
            let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
    }

    /// Counts changes from now on and stops the processes making them at
    /// the `n`-th (1: the first); `None` only counts.
    pub fn stop_at(&self, n: Option<u64>) {
        let (lock, cv) = &*self.fs.1;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        *g = Gate { ops: 0, stop_at: n, frozen: false, held: false };
        cv.notify_all();
    }

    /// Changes made since [`PowerCut::stop_at`].
    pub fn changes(&self) -> u64 {
        self.fs.1 .0.lock().unwrap_or_else(|e| e.into_inner()).ops
    }

    /// Waits until the stop is reached, at most `timeout`; whether it was.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.fs.1;
        let g = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv.wait_timeout_while(g, timeout, |g| !g.frozen).unwrap_or_else(|e| e.into_inner());
        g.frozen
    }

    /// Answers the held change with an error (send SIGKILL first); every
    /// change after it fails too, until [`PowerCut::thaw`].
    pub fn release(&self) {
        let (lock, cv) = &*self.fs.1;
        lock.lock().unwrap_or_else(|e| e.into_inner()).held = false;
        cv.notify_all();
    }

    /// Lets changes happen again (after the stopped processes are dead).
    pub fn thaw(&self) {
        self.stop_at(None);
    }

    /// What the model counted so far.
    pub fn counts(&self) -> Counts {
        self.fs.model().counts
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        self.thaw();
        self.detach();
    }
}
