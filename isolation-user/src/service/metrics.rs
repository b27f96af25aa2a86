//! `/metrics`: the datapath's counters and the service's health as Prometheus text
//! (OpenMetrics, `prometheus-client`'s encoder). Read from the backend at every scrape, so
//! a scrape always sees what `stats` and `status` would print at that moment.

use anyhow::Result;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

use super::Health;
use crate::{engine, render::verdict, state::Paths};

type Labels = Vec<(&'static str, String)>;
type Fam<M> = Family<Labels, M>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn fam<M>(r: &mut Registry, name: &str, help: &str) -> Fam<M>
where
    Fam<M>: prometheus_client::registry::Metric + Default + Clone,
{
    let f = Fam::<M>::default();
    r.register(name, help, f.clone());
    f
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    r.register(name, help, g);
}

/// The whole text of one scrape.
pub fn render(paths: &Paths, health: &Health) -> String {
    let mut r = Registry::with_prefix("isolation");
    let build: Fam<Gauge> = fam(
        &mut r,
        "build_info",
        "This service's build: version, git commit and the hash of its BPF object",
    );
    build
        .get_or_create(&vec![
            ("version", crate::VERSION.into()),
            ("commit", crate::COMMIT.into()),
            ("bpf_object", crate::BPF_HASH.into()),
        ])
        .set(1);
    let reloads: Fam<Counter> = fam(
        &mut r,
        "reloads",
        "Policy applies by the service (start, file change, SIGHUP), by result",
    );
    reloads
        .get_or_create(&vec![("result", "ok".into())])
        .inc_by(health.reloads_ok);
    reloads
        .get_or_create(&vec![("result", "error".into())])
        .inc_by(health.reloads_failed);
    gauge(
        &mut r,
        "last_reload_success",
        "1 if the last apply of the policy file succeeded, 0 if it was refused (the old policy stays)",
        health.last_ok as i64,
    );
    let t = FloatGauge::default();
    t.set(health.last_time);
    r.register(
        "last_reload_timestamp_seconds",
        "When the policy file was last applied or refused (Unix time)",
        t,
    );
    if let Some(up) = health.source_up {
        gauge(
            &mut r,
            "source_up",
            "1 if the policy source (etcd) is reachable now",
            up as i64,
        );
        gauge(
            &mut r,
            "source_revision",
            "The etcd mod revision of the policy this node runs (0: none yet)",
            health.source_revision,
        );
        let restarts = Counter::<u64>::default();
        restarts.inc_by(health.follower_restarts);
        r.register(
            "source_restarts",
            "How often the etcd follower died and was started again",
            restarts,
        );
    }
    if let Some(f) = &health.decisions {
        gauge(
            &mut r,
            "decisions_up",
            "1 if the last poll of the decisions feed (CrowdSec LAPI) was answered and enforced",
            f.up as i64,
        );
        let polls: Fam<Counter> = fam(
            &mut r,
            "decisions_polls",
            "Polls of the decisions feed, by result",
        );
        polls
            .get_or_create(&vec![("result", "ok".into())])
            .inc_by(f.polls_ok);
        polls
            .get_or_create(&vec![("result", "error".into())])
            .inc_by(f.polls_failed);
        let t = FloatGauge::default();
        t.set(f.last_ok_time);
        r.register(
            "decisions_last_success_timestamp_seconds",
            "When the decisions feed was last answered and enforced (Unix time; 0: never)",
            t,
        );
        let ign = Counter::<u64>::default();
        ign.inc_by(f.ignored);
        r.register(
            "decisions_ignored",
            "Decisions received and not enforced (not a ban of an Ip or a Range)",
            ign,
        );
    }
    let expired = Counter::<u64>::default();
    expired.inc_by(health.blocklist_expired);
    r.register(
        "blocklist_expired",
        "Blocklist entries removed after their deadline (they stopped matching at it)",
        expired,
    );
    // Without the engine's lock: a scrape must never hold off a change. A read that met a
    // change halfway (the iptables backend's sets being swapped) is tried once more
    // (`datapath` reads everything before it registers anything).
    let up = match datapath(&mut r, paths).or_else(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        datapath(&mut r, paths)
    }) {
        Ok(()) => 1,
        Err(e) => {
            tracing::warn!("metrics: cannot read the datapath: {e:#}");
            0
        }
    };
    gauge(
        &mut r,
        "datapath_up",
        "1 if the datapath's counters could be read at this scrape",
        up,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Blocklist entries in force by (family, kind, origin).
fn blocked_counts(
    paths: &Paths,
) -> Result<std::collections::BTreeMap<(&'static str, &'static str, String), u64>> {
    let mut out = std::collections::BTreeMap::new();
    for e in engine::blocked(paths)? {
        let family = if e.entry.contains(':') {
            "ipv6"
        } else {
            "ipv4"
        };
        let kind = if e.entry.contains('/') {
            "cidr"
        } else {
            "address"
        };
        *out.entry((family, kind, e.origin)).or_insert(0) += 1;
    }
    Ok(out)
}

/// What the backend says: verdicts, rules, map fill, ring losses, generation, backend.
/// Every read comes before the first registration, so a failed call registered nothing.
fn datapath(r: &mut Registry, paths: &Paths) -> Result<()> {
    let (b, st) = engine::open(paths)?;
    let live = engine::rules(paths)?;
    let c = b.counters(&live)?;
    let s = b.status(&st)?;
    let info: Fam<Gauge> = fam(r, "backend_info", "The backend that enforces the policy");
    info.get_or_create(&vec![
        ("backend", b.kind().name().into()),
        ("detail", s.detail.clone()),
    ])
    .set(1);
    gauge(
        r,
        "policy_generation",
        "Generation of the live policy (one more at every change)",
        s.generation as i64,
    );
    let packets: Fam<Counter> = fam(
        r,
        "packets",
        "Packets by verdict reason (as `stats`); direction ingress is the verdict, egress the tracking",
    );
    let bytes: Fam<Counter> = fam(r, "bytes", "Bytes by verdict reason (as `stats`)");
    for (reason, n) in &c.reasons {
        let l = vec![
            ("reason", reason.name().to_string()),
            ("verdict", verdict(*reason).to_lowercase()),
            (
                "direction",
                if reason.is_egress() {
                    "egress"
                } else {
                    "ingress"
                }
                .into(),
            ),
        ];
        packets.get_or_create(&l).inc_by(n.packets);
        bytes.get_or_create(&l).inc_by(n.bytes);
    }
    let rp: Fam<Counter> = fam(
        r,
        "rule_packets",
        "Packets decided by each allow/except rule since the policy was last swapped in",
    );
    let rb: Fam<Counter> = fam(r, "rule_bytes", "Bytes decided by each allow/except rule");
    for x in &c.rules {
        let l = vec![
            ("kind", x.kind.to_string()),
            ("index", x.index.to_string()),
            ("rule", x.rule.clone()),
        ];
        rp.get_or_create(&l).inc_by(x.packets);
        rb.get_or_create(&l).inc_by(x.bytes);
    }
    let log: Fam<Counter> = fam(
        r,
        "log_events",
        "Logged drops: written to the ring, suppressed by the rate limit, lost (ring full)",
    );
    for (k, v) in [
        ("written", c.log.written),
        ("suppressed", c.log.suppressed),
        ("lost", c.log.lost),
    ] {
        // What the backend cannot count is left out, not shown as a 0.
        if k == "lost" && c.uncounted.log_lost {
            continue;
        }
        log.get_or_create(&vec![("outcome", k.into())]).inc_by(v);
    }
    let conns: Fam<Gauge> = fam(r, "connections", "Connections remembered, by table");
    let conns_max: Fam<Gauge> = fam(r, "connections_max", "Capacity of each connection table");
    for (k, n, m) in [
        ("new", c.connections.new, c.connections.new_max),
        (
            "established",
            c.connections.established,
            c.connections.established_max,
        ),
    ] {
        if k == "new" && c.uncounted.new_connections {
            continue;
        }
        conns
            .get_or_create(&vec![("table", k.into())])
            .set(n as i64);
        conns_max
            .get_or_create(&vec![("table", k.into())])
            .set(m as i64);
    }
    if !c.uncounted.connection_filter {
        let set: Fam<Gauge> = fam(
            r,
            "connection_filter_slots_set",
            "Slots set in the filter of remote hosts in front of the connection tables",
        );
        set.get_or_create(&vec![])
            .set(c.connections.filter_set as i64);
        let all: Fam<Gauge> = fam(
            r,
            "connection_filter_slots",
            "Slots of the filter of remote hosts in front of the connection tables",
        );
        all.get_or_create(&vec![])
            .set(c.connections.filter_slots as i64);
    }
    let fill: Fam<Gauge> = fam(r, "map_entries", "Entries in each map (set)");
    let cap: Fam<Gauge> = fam(r, "map_max_entries", "Capacity of each map (set)");
    for m in &s.maps {
        let l = vec![("map", m.name.clone())];
        fill.get_or_create(&l).set(m.entries as i64);
        cap.get_or_create(&l).set(m.max_entries as i64);
    }
    let (entries, max) = (blocked_counts(paths)?, b.limits());
    let be: Fam<Gauge> = fam(
        r,
        "blocklist_entries",
        "Blocklist entries in force, by family, kind and origin (policy: permanent)",
    );
    for ((family, kind, origin), n) in entries {
        be.get_or_create(&vec![
            ("family", family.into()),
            ("kind", kind.into()),
            ("origin", origin),
        ])
        .set(n as i64);
    }
    let bc: Fam<Gauge> = fam(
        r,
        "blocklist_capacity",
        "How many blocklist entries the backend holds, per family and kind",
    );
    for family in ["ipv4", "ipv6"] {
        for (kind, n) in [
            ("address", max.blocklist_addresses),
            ("cidr", max.blocklist_cidrs),
        ] {
            bc.get_or_create(&vec![("family", family.into()), ("kind", kind.into())])
                .set(n as i64);
        }
    }
    let att: Fam<Gauge> = fam(
        r,
        "interface_attached",
        "1 if the datapath is attached to the interface",
    );
    for i in &s.interfaces {
        att.get_or_create(&vec![
            ("iface", i.name.clone()),
            ("mode", i.xdp_mode.clone()),
        ])
        .set(i.attached as i64);
    }
    Ok(())
}
