//! A process as `/proc` shows it: resident memory and its peak, CPU time,
//! threads, open descriptors, and whether it is still running. Reading
//! `/proc` needs nothing from the process itself (no descriptor, no
//! cooperation), so it works on a broker that is out of descriptors.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// `/proc/self` or `/proc/<pid>`.
#[derive(Clone, Debug)]
pub struct Proc {
    dir: String,
}

impl Proc {
    /// This process.
    pub fn this() -> Proc {
        Proc {
            dir: "/proc/self".into(),
        }
    }

    /// Process `pid`.
    pub fn of(pid: u32) -> Proc {
        Proc {
            dir: format!("/proc/{pid}"),
        }
    }

    fn read(&self, file: &str) -> String {
        let path = format!("{}/{file}", self.dir);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    /// A numeric field of `status`, in its own unit (kB for `VmRSS`).
    pub fn status_field(&self, name: &str) -> u64 {
        status_field(&self.read("status"), name)
    }

    /// Resident set size, in bytes.
    pub fn rss(&self) -> u64 {
        self.status_field("VmRSS") * 1024
    }

    /// Resident set size and its peak (`VmHWM`), in bytes, from one read.
    pub fn memory(&self) -> (u64, u64) {
        let status = self.read("status");
        (
            status_field(&status, "VmRSS") * 1024,
            status_field(&status, "VmHWM") * 1024,
        )
    }

    pub fn threads(&self) -> u64 {
        self.status_field("Threads")
    }

    /// How many descriptors are open.
    pub fn descriptors(&self) -> usize {
        let path = format!("{}/fd", self.dir);
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("list {path}: {e}"))
            .count()
    }

    /// `stat` from its field 3 (the state) on; see [`stat_fields`].
    pub fn stat(&self) -> Vec<String> {
        stat_fields(&self.read("stat"))
    }

    /// Whether the process is still running. One that died but was not
    /// reaped yet is a zombie (state `Z`); once reaped it has no `/proc`
    /// entry (or, for a pid, possibly another process's).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("{}/stat", self.dir))
            .is_ok_and(|stat| !matches!(stat_fields(&stat)[0].as_str(), "Z" | "X"))
    }

    /// User plus system CPU time so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(&self.stat())
    }

    /// User plus system CPU time so far.
    pub fn cpu(&self) -> Duration {
        ticks(self.cpu_ticks())
    }
}

/// A process's `stat`, opened once and re-read from offset 0 each time, so
/// that reading it needs no free descriptor.
pub struct OpenStat(File);

impl OpenStat {
    pub fn open(proc: &Proc) -> OpenStat {
        let path = format!("{}/stat", proc.dir);
        OpenStat(File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}")))
    }

    /// User plus system CPU time so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let mut buffer = [0u8; 1024];
        let n = self.0.read_at(&mut buffer, 0).expect("read a stat file");
        let stat = std::str::from_utf8(&buffer[..n]).expect("a stat line");
        cpu_ticks(&stat_fields(stat))
    }
}

/// Clock ticks per second, the unit of the times in `stat`: `getconf
/// CLK_TCK` (the tests have no libc binding to call
/// `sysconf(_SC_CLK_TCK)`), else 100, which is what Linux uses on every
/// common architecture.
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// `ticks` clock ticks as a duration.
pub fn ticks(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_sec() as f64)
}

/// `name: value [unit]` from a `status` file, the value only.
fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in a /proc status"))
}

/// The fields of a `stat` line from field 3 (the state) on: the command
/// name (field 2) is in parentheses and may hold spaces.
pub fn stat_fields(stat: &str) -> Vec<String> {
    let rest = &stat[stat.rfind(')').expect("a stat line") + 1..];
    rest.split_whitespace().map(str::to_string).collect()
}

/// utime plus stime, fields 14 and 15 of stat(5), from [`stat_fields`]
/// (which start at field 3).
fn cpu_ticks(fields: &[String]) -> u64 {
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}
