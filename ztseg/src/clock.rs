//! Token deadlines in the kernel's clock.
//!
//! Programs compare `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME, which keeps counting through
//! suspend and never jumps) against the agent's deadline. Tokens carry wall-clock `exp` seconds;
//! the conversion happens once, when a token is granted.

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds on CLOCK_BOOTTIME now.
pub fn boot_now_ns() -> u64 {
    clock_ns(ClockId::CLOCK_BOOTTIME)
}

/// Nanoseconds since the Unix epoch now.
pub fn unix_now_ns() -> u64 {
    clock_ns(ClockId::CLOCK_REALTIME)
}

/// Both clocks read at (nearly) one instant: (boot ns, Unix ns). A thread preempted between the
/// two reads would pair readings milliseconds apart and shift every wall-clock time derived from
/// them; the pair whose boot-clock reads bracket the wall-clock read most tightly of a few tries
/// is taken.
pub fn boot_and_unix_now_ns() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..4 {
        let before = boot_now_ns();
        let unix = unix_now_ns();
        let after = boot_now_ns();
        let spread = after.saturating_sub(before);
        if spread < best.0 {
            best = (spread, before + spread / 2, unix);
        }
        if spread < 2_000 {
            break;
        }
    }
    (best.1, best.2)
}

/// Whole seconds since the Unix epoch now (what token claims count in).
pub fn unix_now_secs() -> u64 {
    unix_now_ns() / 1_000_000_000
}

fn clock_ns(clock: ClockId) -> u64 {
    // Both clocks always exist on Linux; a failure would be a broken kernel. 0 fails closed for
    // deadlines: an expiry computed from it is in the past.
    clock_gettime(clock)
        .map_or(0, |t| (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
}

/// The boot-clock deadline for a wall-clock expiry `exp_unix_secs`, given both clocks read at the
/// same instant. Never 0 (which the kernel reads as "no token"); an expiry in the past gives a
/// deadline that has already passed.
pub const fn boot_deadline(exp_unix_secs: u64, unix_now_ns: u64, boot_now_ns: u64) -> u64 {
    let exp_ns = exp_unix_secs.saturating_mul(1_000_000_000);
    let deadline =
        if exp_ns <= unix_now_ns { boot_now_ns } else { boot_now_ns.saturating_add(exp_ns - unix_now_ns) };
    if deadline == 0 { 1 } else { deadline }
}

/// [`boot_deadline`] with the clocks read now.
pub fn boot_deadline_now(exp_unix_secs: u64) -> u64 {
    boot_deadline(exp_unix_secs, unix_now_ns(), boot_now_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_the_remaining_lifetime_on_the_boot_clock() {
        let unix_now = 1_800_000_000 * 1_000_000_000;
        assert_eq!(boot_deadline(1_800_000_300, unix_now, 5_000), 5_000 + 300_000_000_000);
        assert_eq!(boot_deadline(1_700_000_000, unix_now, 5_000), 5_000);
        assert_eq!(boot_deadline(0, unix_now, 0), 1);
        assert_eq!(boot_deadline(u64::MAX, unix_now, 5), 5 + (u64::MAX - unix_now));
    }

    #[test]
    fn clocks_tick() {
        let (a, b) = (boot_now_ns(), boot_now_ns());
        assert!(a > 0 && b >= a);
        assert!(unix_now_ns() > 1_700_000_000 * 1_000_000_000);
    }
}
