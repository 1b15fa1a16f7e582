//! The events ring read in place. Records are taken in order, but the kernel's consumer position
//! moves only when the audit writer has written them to the log ([`Consumer::release`]): a daemon
//! killed in between (SIGKILL, the OOM killer, a panic) leaves them in the ring, and the next
//! start reads them again. Records the kernel has not released count as unread for it, so the
//! programs' view of the ring's fill (denials shed past half, allows refused when full) covers
//! what the daemon holds too.
//!
//! The layout is the kernel's (`kernel/bpf/ringbuf.c`, as libbpf reads it): a writable consumer
//! page at offset 0, then a read-only producer page and the data area mapped twice in a row, so a
//! record that wraps is contiguous. Each record has an 8-byte header whose length carries a busy
//! bit (not yet submitted) and a discard bit.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: u64 = 8;

/// The ring's two mappings; unmapped when the reader and every [`Consumer`] are gone.
struct Mapping {
    consumer: NonNull<u8>,
    /// The producer page, then the data area twice.
    producer: NonNull<u8>,
    page: usize,
    data_bytes: usize,
}

// SAFETY: the mappings are shared memory the kernel writes concurrently; every access goes
// through atomics (positions, headers) or reads bytes the kernel no longer writes (a record
// between the consumer and a committed header).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the two regions mapped in `Ring::new`, with their lengths; nothing refers to
        // them once the last owner is dropped.
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(self.producer.as_ptr().cast(), self.page + 2 * self.data_bytes);
        }
    }
}

impl Mapping {
    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer position is the first 8 bytes of its page, 8-byte aligned.
        unsafe { &*self.consumer.as_ptr().cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: as for the consumer position, in the producer page.
        unsafe { &*self.producer.as_ptr().cast::<AtomicU64>() }
    }

    fn data(&self) -> *const u8 {
        // SAFETY: the data area follows the producer page in the same mapping.
        unsafe { self.producer.as_ptr().add(self.page) }
    }
}

/// The reading side: a cursor of its own ahead of the kernel's consumer position.
pub struct Ring {
    map: Arc<Mapping>,
    read: u64,
    mask: u64,
}

/// Releases records back to the kernel once they are written.
#[derive(Clone)]
pub struct Consumer {
    map: Arc<Mapping>,
}

impl Consumer {
    /// Everything before ring position `pos` is written: the kernel may reuse its space.
    /// Positions only grow; an older one is ignored.
    pub fn release(&self, pos: u64) {
        let consumer = self.map.consumer_pos();
        if pos > consumer.load(Ordering::Relaxed) {
            consumer.store(pos, Ordering::Release);
        }
    }

    /// Bytes of the ring the kernel cannot reuse yet (records not read, or read and not yet
    /// released), and the size of its data area.
    pub fn fill(&self) -> (u64, u64) {
        let consumer = self.map.consumer_pos().load(Ordering::Acquire);
        let producer = self.map.producer_pos().load(Ordering::Acquire);
        (producer.saturating_sub(consumer), self.map.data_bytes as u64)
    }
}

impl Ring {
    /// Maps the ring map `fd` whose data area is `data_bytes` long (its `max_entries`), reading
    /// from the kernel's consumer position: whatever an earlier daemon took and did not release
    /// is read again.
    pub fn new(fd: BorrowedFd<'_>, data_bytes: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_err(io::Error::other)?;
        let map = |len: usize, prot: libc::c_int, offset: usize| -> io::Result<NonNull<u8>> {
            // SAFETY: a fresh shared mapping of the ring's fd at the offsets and lengths the
            // kernel's ringbuf mmap accepts (the first page writable, the rest read-only).
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
        };
        let consumer = map(page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match map(page + 2 * data_bytes, libc::PROT_READ, page) {
            Ok(producer) => producer,
            Err(e) => {
                // SAFETY: the consumer page just mapped.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        let map = Arc::new(Mapping { consumer, producer, page, data_bytes });
        let read = map.consumer_pos().load(Ordering::Acquire);
        Ok(Self { map, read, mask: data_bytes as u64 - 1 })
    }

    /// The handle the audit writer releases records with.
    pub fn consumer(&self) -> Consumer {
        Consumer { map: self.map.clone() }
    }

    /// The ring position after the last record taken.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// The next submitted record, copied out; `None` when none is ready. Discarded records are
    /// skipped. The kernel's consumer position does not move.
    pub fn next(&mut self, out: &mut Vec<u8>) -> bool {
        loop {
            let produced = self.map.producer_pos().load(Ordering::Acquire);
            if self.read >= produced {
                return false;
            }
            let offset = (self.read & self.mask) as usize;
            // SAFETY: a record header inside the data area (positions are 8-byte aligned and
            // the area is a power of two); the kernel writes it atomically.
            let header = unsafe { &*self.map.data().add(offset).cast::<AtomicU32>() };
            let len = header.load(Ordering::Acquire);
            if len & BUSY_BIT != 0 {
                return false;
            }
            let body = len & !(BUSY_BIT | DISCARD_BIT);
            if body as usize > self.map.data_bytes {
                // Not a header the kernel wrote; stop rather than read past the mapping.
                return false;
            }
            self.read += (u64::from(body) + HEADER_BYTES + 7) & !7;
            if len & DISCARD_BIT != 0 {
                continue;
            }
            out.clear();
            // SAFETY: the submitted record's body follows its header; the double mapping makes
            // it contiguous even when it wraps, and the kernel does not touch it until it is
            // released.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(self.map.data().add(offset + HEADER_BYTES as usize), body as usize)
            });
            return true;
        }
    }
}
