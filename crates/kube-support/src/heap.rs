//! glibc's allocator, tuned for processes that hold many small objects for
//! a long time and build large transient ones beside them (a watch's
//! initial list, a whole plan, the kernel's table read back).

/// glibc gives threads that allocate their own arenas (up to 8 per core),
/// and memory freed in one is never reused by another: the controller's
/// caches spread over them, and its resident memory at 10,000 objects
/// swung between 108 and 185 MB from run to run. The agent allocates its
/// resync's plan on one thread and reads the kernel on another: one arena
/// took its peak at 226,000 objects from 299 to 289 MB. Call before any
/// thread starts; `MALLOC_ARENA_MAX` in the environment still wins.
pub fn cap_arenas(arenas: i32) {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// glibc serves an allocation of 128 KiB or more with its own mapping,
/// returned when freed, but raises that threshold to the size of each such
/// block freed: after the first, a tenant's 250 KiB annotations (decoded,
/// then dropped) came from the heap and stayed resident, +21% (controller)
/// and +26% (agent) over the same 300 rules without them, even after a
/// trim. Fixed at 128 KiB, they were +0% and +8%. Call before any thread
/// starts; `MALLOC_MMAP_THRESHOLD_` in the environment still wins.
pub fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        }
    }
}

/// As often as the agent's resync, which builds the largest transients.
const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Hands the pages freed inside the heap back to the kernel. glibc
/// returns only the heap's top on its own: the pages a transient freed
/// between long-lived objects stay resident. Walks the heap (12 to 15 ms
/// at 290 MB).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 and malloc_trim only read and adjust the
        // allocator's own state, under its locks.
        let (before, released) = unsafe {
            let before = libc::mallinfo2();
            (before, libc::malloc_trim(0) == 1)
        };
        tracing::debug!(
            in_use_mb = before.uordblks >> 20,
            free_held_mb = before.fordblks >> 20,
            released,
            "heap trimmed"
        );
    }
}

/// Trims every `TRIM_PERIOD` (one trim after a resync's old planner went:
/// 294 to 224 MB at 226,000 objects), on a thread of its own: the walk
/// must not hold up a runtime worker.
pub fn start_trimming() {
    let spawned = std::thread::Builder::new().name("malloc-trim".into()).spawn(|| {
        loop {
            std::thread::sleep(TRIM_PERIOD);
            trim();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the heap trimmer; resident memory may stay above what is used");
    }
}
