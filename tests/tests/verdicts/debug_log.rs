//! The program's debug log: off by default, sampled when on.

use limiter_agent::{
    dataplane::LoadOptions,
    plan::{CountKind, KernelPlan, Unit},
};

use crate::{load, rule, udp4, verdict};

/// Captures log records (the agent forwards the program's aya-log records to `log`).
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn debug_log_is_off_by_default_and_sampled_when_on() {
    log::set_logger(&CAPTURE).expect("only this test installs a logger");
    log::set_max_level(log::LevelFilter::Trace);
    let strict =
        || KernelPlan { rules: vec![rule("strict", CountKind::Packets, 1, Unit::Hour, 0)], ..Default::default() };
    let frame = udp4().build();

    let mut quiet = load(LoadOptions::default());
    quiet.apply(&strict()).unwrap();
    for _ in 0..100 {
        verdict(&mut quiet, &frame);
    }
    quiet.flush_log();
    assert!(CAPTURE.0.lock().unwrap().iter().all(|l| !l.contains("drop reason")), "no records when off");

    let mut dp = load(LoadOptions { debug_log: true, ..Default::default() });
    dp.apply(&strict()).unwrap();
    let drops = 3000;
    for _ in 0..=drops {
        verdict(&mut dp, &frame);
    }
    dp.flush_log();
    let records = CAPTURE.0.lock().unwrap().iter().filter(|l| l.contains("drop reason")).count();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // First drop, then one in 1024, per CPU the test thread ran on.
    assert!(records >= 1, "at least the first drop is logged");
    assert!(records <= cpus * (drops / 1024 + 1), "{records} records for {drops} drops: not sampled");
}
