//! The cluster tests again with membership from a real etcd (Debian's
//! `etcd-server`, started by the tests on free loopback ports with its data
//! in a temporary directory): brokers find each other and route exactly; a
//! broker frozen past its lease leaves every member list and comes back;
//! brokers keep their last members while etcd is down.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::etcd::Etcd;
use common::mesh::*;
use common::{ChildBroker, Metrics, Rng};

/// A cluster name no other test (or earlier run) uses.
fn cluster_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn mesh(etcd: &Etcd) -> Mesh {
    let membership = Membership::Etcd {
        url: etcd.client_url.clone(),
        name: cluster_name(),
    };
    Mesh::start_with(membership, &[])
}

fn signal(broker: &ChildBroker, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &broker.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} failed");
}

fn members(metrics: &Metrics) -> u64 {
    metrics.get("zbroker_cluster_members")
}

#[test]
fn three_brokers_find_each_other_in_etcd_and_route_exactly() {
    let etcd = Etcd::start();
    let mesh = mesh(&etcd);
    for name in ["a", "b", "c"] {
        let m = mesh
            .broker(name)
            .wait_for("two members", |m| members(m) == 2);
        assert_eq!(m.get("zbroker_cluster_registry_up"), 1);
    }
    let mut rng = Rng::new(seed());
    let mut members = random_members(&mesh, &mut rng, 3);
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("b"));
    let mut all: Vec<&mut Member> = members.iter_mut().collect();
    let mut published = Vec::new();
    publish_and_collect(&publisher, &mut rng, 300, "m", &mut all, &mut published);
    for member in &all {
        assert_exactly_matching(member, &published);
    }
    // Registered under the cluster's prefix, one key per broker.
    let keys = etcd.get_prefix("/zbroker/");
    for name in ["a", "b", "c"] {
        assert!(
            keys.iter()
                .any(|kv| kv.key.ends_with(&format!("/members/{name}"))),
            "no key for {name} in {keys:?}"
        );
    }
}

#[test]
fn a_broker_frozen_past_its_lease_leaves_every_member_list_and_comes_back() {
    let etcd = Etcd::start();
    let mesh = mesh(&etcd);
    let mut a0 = Member::join("a0", &mesh.sub_endpoint("a"), everything());
    let mut c0 = Member::join("c0", &mesh.sub_endpoint("c"), everything());
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    probe_all(&publisher, &mut [&mut a0, &mut c0]);

    // Frozen longer than its 2 s lease: etcd drops its key, a and b drop
    // it from their member lists (and its link).
    signal(mesh.broker("c"), "-STOP");
    for name in ["a", "b"] {
        mesh.broker(name)
            .wait_for("c gone from the members", |m| members(m) == 1);
    }
    let mut rng = Rng::new(seed());
    let published = publish_random(&publisher, &mut rng, 50, "without-c");
    collect_all(&publisher, &mut [&mut a0], &[50]);
    assert_exactly_matching(&a0, &published);

    // Thawed, it finds its lease gone, registers again, and the others
    // link to it again; its subscriber gets messages from a once more.
    signal(mesh.broker("c"), "-CONT");
    mesh.broker("c").wait_for_log("etcd reachable again");
    for name in ["a", "b"] {
        mesh.broker(name)
            .wait_for("c back in the members", |m| members(m) == 2);
    }
    mesh.wait_until_linked();
    c0.received.clear();
    probe_all(&publisher, &mut [&mut a0, &mut c0]);
    let after = publish_random(&publisher, &mut rng, 50, "c-back");
    collect_all(&publisher, &mut [&mut c0], &[50]);
    assert_exactly_matching(&c0, &after);
    let c = mesh.broker("c").metrics();
    assert!(
        c.get("zbroker_cluster_registry_losses_total") >= 1,
        "c never counted losing its registration"
    );
}

#[test]
fn brokers_keep_their_members_and_route_while_etcd_is_down() {
    let mut etcd = Etcd::start();
    let mesh = mesh(&etcd);
    let mut b0 = Member::join("b0", &mesh.sub_endpoint("b"), everything());
    let mut c0 = Member::join("c0", &mesh.sub_endpoint("c"), everything());
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    probe_all(&publisher, &mut [&mut b0, &mut c0]);

    etcd.stop();
    for name in ["a", "b", "c"] {
        let m = mesh.broker(name).wait_for("etcd seen down", |m| {
            m.get("zbroker_cluster_registry_up") == 0
        });
        assert_eq!(
            members(&m),
            2,
            "{name} forgot its members while etcd was down"
        );
    }
    mesh.broker("a")
        .wait_for_log("keeping the last known members");
    let mut rng = Rng::new(seed());
    let published = publish_random(&publisher, &mut rng, 100, "etcd-down");
    collect_all(&publisher, &mut [&mut b0, &mut c0], &[100, 100]);
    assert_exactly_matching(&b0, &published);
    assert_exactly_matching(&c0, &published);

    etcd.restart();
    for name in ["a", "b", "c"] {
        mesh.broker(name).wait_for("etcd back, members kept", |m| {
            m.get("zbroker_cluster_registry_up") == 1 && members(m) == 2
        });
    }
}
