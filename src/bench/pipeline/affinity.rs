//! Thread placement and timing for the benchmark's threads: pinning each rank (and the threads
//! it starts: its streams) to one core, as a GPU is one compute resource that its streams share;
//! and precise timed waits for the modelled link's delivery thread.

#[cfg(target_os = "linux")]
mod sys {
    /// glibc's `cpu_set_t`: 1024 bits.
    pub type CpuSet = [u64; 16];
    unsafe extern "C" {
        fn sched_getaffinity(pid: i32, size: usize, mask: *mut CpuSet) -> i32;
        fn sched_setaffinity(pid: i32, size: usize, mask: *const CpuSet) -> i32;
    }

    pub fn allowed() -> Vec<usize> {
        let mut set: CpuSet = [0; 16];
        // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { sched_getaffinity(0, std::mem::size_of::<CpuSet>(), &mut set) };
        if rc != 0 {
            return Vec::new();
        }
        (0..1024)
            .filter(|&c| set[c / 64] >> (c % 64) & 1 == 1)
            .collect()
    }

    pub fn pin(cpu: usize) -> bool {
        let mut set: CpuSet = [0; 16];
        if cpu >= 1024 {
            return false;
        }
        set[cpu / 64] |= 1 << (cpu % 64);
        // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
        unsafe { sched_setaffinity(0, std::mem::size_of::<CpuSet>(), &set) == 0 }
    }

    /// `PR_SET_TIMERSLACK` of `prctl(2)`.
    const PR_SET_TIMERSLACK: i32 = 29;
    unsafe extern "C" {
        fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    }

    pub fn precise_timers() -> bool {
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument (nanoseconds) and affects only
        // the calling thread; the unused arguments are zero.
        unsafe { prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0 }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn allowed() -> Vec<usize> {
        Vec::new()
    }
    pub fn pin(_cpu: usize) -> bool {
        false
    }
    pub fn precise_timers() -> bool {
        false
    }
}

/// The CPUs this thread may run on.
pub fn allowed() -> Vec<usize> {
    sys::allowed()
}

/// Pin the calling thread (and the threads it starts later) to `cpu`.
pub fn pin(cpu: usize) -> bool {
    sys::pin(cpu)
}

/// Make the calling thread's timed waits wake when asked. Linux lets a normal thread's timers
/// fire up to its timer slack late (50 µs by default), which would make every modelled message
/// arrive about 50 µs after its time: more than the modelled latency itself.
pub fn precise_timers() -> bool {
    sys::precise_timers()
}
