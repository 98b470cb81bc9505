//! glibc's allocator, tuned for processes that hold many small objects for
//! a long time and build large transient ones beside them (a watch's
//! initial list, a whole plan, nft's listing read back).

/// glibc gives threads that allocate their own arenas (up to 8 per core):
/// the controller's caches spread over them, and its resident memory at
/// 10,000 objects swung between 108 and 185 MB from run to run. Set before
/// any thread starts; `MALLOC_ARENA_MAX` in the environment still wins.
pub fn cap_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// As often as the agent's resync, which builds the largest transients.
const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Every `TRIM_PERIOD`, hands the pages freed inside the heap back to the
/// kernel. glibc returns only the heap's top on its own: the pages a
/// transient freed between long-lived objects stay resident (one trim
/// after a resync's old planner went: 294 to 224 MB at 226,000 objects).
/// A thread of its own: the trim walks the heap and must not hold up a
/// runtime worker.
pub fn start_trimming() {
    #[cfg(target_env = "gnu")]
    {
        let spawned = std::thread::Builder::new().name("malloc-trim".into()).spawn(|| {
            loop {
                std::thread::sleep(TRIM_PERIOD);
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
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the heap trimmer; resident memory may stay above what is used");
        }
    }
}
