//! `synProxy` on targets: what the plan gets, and the errors it names.

use std::path::Path;

use super::*;
use crate::plan::{Limit, Unit};
use crate::policy::source::{Document, load_file_str};

const NATIVE: &str = "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\n";

fn compiled(text: &str) -> Compiled {
    let mut set = PolicySet::default();
    for d in load_file_str(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}")) {
        if let Document::Policy(p) = d {
            set.policies.push(p);
        }
    }
    let c = compile(&set);
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    c
}

fn error_of(text: &str) -> String {
    match load_file_str(Path::new("p.yaml"), text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn port_targets_turn_the_proxy_on_always_or_above_a_threshold() {
    let c = compiled(&format!(
        "{NATIVE}metadata: {{name: web}}\nspec:\n  targetRefs:\n\
         \x20   - {{kind: Port, port: 9100, synProxy: {{mode: Always}}}}\n\
         \x20   - {{kind: Port, port: 443, protocol: TCP, synProxy: {{mode: Threshold, threshold: {{requests: 200, unit: Second, burst: 50}}}}}}\n\
         \x20   - {{kind: Port, port: 8080}}\n\
         \x20   - {{kind: Port, port: 8081, synProxy: {{mode: Off}}}}\n"
    ));
    assert_eq!(
        c.plan.synproxy,
        vec![
            SynproxyTarget { port: 9100, mode: SynproxyMode::Always, policy: "web".into() },
            SynproxyTarget {
                port: 443,
                mode: SynproxyMode::Threshold(Limit { requests: 200, unit: Unit::Second, burst: 50 }),
                policy: "web".into()
            },
        ]
    );
}

#[test]
fn a_port_proxied_twice_gets_the_strictest_mode() {
    let c = compiled(&format!(
        "{NATIVE}metadata: {{name: a}}\nspec:\n  targetRefs:\n\
         \x20   - {{kind: Port, port: 9100, synProxy: {{mode: Threshold, threshold: {{requests: 100, unit: Second}}}}}}\n\
         \x20   - {{kind: Port, port: 9100, synProxy: {{mode: Threshold, threshold: {{requests: 600, unit: Minute}}}}}}\n"
    ));
    let mode = SynproxyMode::Threshold(Limit { requests: 600, unit: Unit::Minute, burst: 0 });
    assert_eq!(c.plan.synproxy, vec![SynproxyTarget { port: 9100, mode, policy: "a".into() }]);
}

#[test]
fn a_shadow_policy_does_not_proxy_and_says_so() {
    let c = compiled(&format!(
        "{NATIVE}metadata: {{name: s}}\nspec:\n  mode: Shadow\n  targetRefs:\n\
         \x20   - {{kind: Port, port: 9100, synProxy: {{mode: Always}}}}\n"
    ));
    assert!(c.plan.synproxy.is_empty());
    assert!(c.notices.iter().any(|n| n.to_string().contains("synProxy")), "{:?}", c.notices);
}

#[test]
fn bad_syn_proxy_settings_are_named_with_their_line() {
    let base = format!("{NATIVE}metadata: {{name: bad}}\nspec:\n  targetRefs:\n");
    let e = error_of(&format!("{base}    - {{kind: Port, port: 53, protocol: UDP, synProxy: {{mode: Always}}}}\n"));
    assert!(e.contains("p.yaml:6:") && e.contains("synProxy") && e.contains("UDP Port"), "{e}");
    let e = error_of(&format!("{base}    - {{kind: Port, port: 80, synProxy: {{mode: Threshold}}}}\n"));
    assert!(e.contains("spec.targetRefs[0].synProxy") && e.contains("threshold"), "{e}");
    let e = error_of(&format!("{base}    - {{kind: Port, port: 80, synProxy: {{mode: Sometimes}}}}\n"));
    assert!(e.contains("spec.targetRefs[0].synProxy.mode") && e.contains("Sometimes"), "{e}");
    let e = error_of(&format!(
        "{base}    - {{kind: Port, port: 80, synProxy: {{mode: Threshold, threshold: {{requests: 5, unit: Fortnight}}}}}}\n"
    ));
    assert!(e.contains("spec.targetRefs[0].synProxy.threshold.unit"), "{e}");
}
