//! Routing-index lookups: `RoutingIndex::matches(topic, &mut out)` for
//! `exact`, `prefix` and `pattern` filters, on a hit (one subscriber's filter
//! matches) and a miss (nothing matches), with 10, 1,000, 100,000 and
//! 1,000,000 non-matching subscriptions in the index, each on its own
//! subscriber id. One more case holds 100,000 subscribers with three distinct
//! filters each (one of every kind), as a broker serving one agent per
//! compute node would.
//!
//! Why: `zbroker_core::index` promises that a match costs O(topic length + matching
//! pairs) whatever the number of subscriptions that do not match. This bench
//! checks that promise where it matters, a million unrelated filters, with
//! Dragonflow-like topics (`neutron.port.<uuid>.update`, tenant and host ids,
//! 30-60 bytes, 3-5 segments). The non-matching filters are spread over many
//! services, resources, tenants and hosts, and many of them share the topic's
//! leading segments, so the walk really goes down crowded branches rather
//! than leaving at the root.
//!
//! After criterion's run it prints, per kind and hit/miss, the per-lookup time
//! at each size divided by the time at 10 subscriptions (the 1M/10 ratio is
//! the headline: near 1 means flat cost). The ratios come from a separate
//! timing loop that alternates batches on the small and the big index, so
//! drift in the load of a shared machine hits both sides alike.
//!
//! For exact and prefix filters the report also gives the number of radix
//! nodes on the topic's path (worked out from the filter texts), and a
//! control: a million filters none of which start with `neutron.`. Together
//! they tell a cost that grows with the index's size from one that grows
//! with how many filters share the topic's leading bytes.
//!
//! `pattern_worst_case` is the security review's CPU case: `S - 1` patterns
//! of `S` segments, all `a` but for one `*` (at a different place in each)
//! and a last segment `nomatch`, matched against `a.a.….a` (`S` segments),
//! which each of them follows up to its last segment and none matches. For
//! `S` = 16 (the broker's default cap on pattern segments) and 64: `hit`
//! matches the same topic again and again, so after the first lookup the
//! match cache answers; `miss` cycles through four times as many such topics
//! (the last segment varies) as the cache holds, so every lookup walks the
//! patterns and then puts its topic into the cache, evicting another.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use zbroker_core::filter::{Filter, FilterKind};
use zbroker_core::index::{MATCH_CACHE_CAPACITY, RoutingIndex, SubId};

const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];
const MAX_LEN: usize = 1024;

/// Deterministic xorshift generator, so every run builds the same indexes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
    /// A Keystone project id: 32 hex digits.
    fn tenant(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
    fn host(&mut self) -> String {
        format!("compute-{:04}", self.below(10_000))
    }
    fn short_id(&mut self) -> String {
        format!("{:08x}", self.next() as u32)
    }
}

const SERVICES: &[&str] = &[
    "neutron", "nova", "df", "ovn", "octavia", "cinder", "glance", "heat",
];
const RESOURCES: &[&str] = &[
    "port", "network", "subnet", "router", "fip", "secgroup", "lswitch", "lport", "chassis", "qos",
];
const EVENTS: &[&str] = &["create", "update", "delete", "bind"];

/// A random Dragonflow-like topic of 3 to 5 segments.
fn topic(rng: &mut Rng) -> String {
    let (svc, res, ev) = (rng.pick(SERVICES), rng.pick(RESOURCES), rng.pick(EVENTS));
    match rng.below(4) {
        0 => format!("{svc}.{res}.{}", rng.uuid()),
        1 => format!("{svc}.{res}.{}.{ev}", rng.uuid()),
        2 => format!("{svc}.{}.{res}.{ev}", rng.tenant()),
        _ => format!("{svc}.{}.{res}.{}.{ev}", rng.host(), rng.short_id()),
    }
}

/// A random filter of `kind`, distinct in practice from every other one
/// (each carries a 32- to 128-bit random id).
fn filter_text(kind: FilterKind, rng: &mut Rng) -> String {
    match kind {
        FilterKind::Exact => topic(rng),
        FilterKind::Prefix => {
            let (svc, res) = (rng.pick(SERVICES), rng.pick(RESOURCES));
            match rng.below(4) {
                // An object and all its events.
                0 => format!("{svc}.{res}.{}.", rng.uuid()),
                1 => format!("{svc}.{res}.{}", rng.uuid()),
                // A raw byte cut partway into an id, as ZeroMQ SUB users do:
                // these pile up under the topic's own `service.resource.`.
                2 => {
                    let id = rng.uuid();
                    let cut = 4 + rng.below(id.len() - 4);
                    format!("{svc}.{res}.{}", &id[..cut])
                }
                _ => format!("{svc}.{}.{res}.", rng.tenant()),
            }
        }
        FilterKind::Pattern => {
            let (svc, res, ev) = (rng.pick(SERVICES), rng.pick(RESOURCES), rng.pick(EVENTS));
            match rng.below(6) {
                0 => format!("{svc}.{res}.{}.*", rng.uuid()),
                1 => format!("{svc}.{res}.{}.>", rng.uuid()),
                2 => format!("{svc}.*.{}.>", rng.uuid()),
                3 => format!("*.{res}.{}.{ev}", rng.uuid()),
                4 => format!("{svc}.{}.*.{ev}", rng.tenant()),
                _ => format!("{svc}.{}.{res}.*.{}", rng.host(), rng.short_id()),
            }
        }
    }
}

/// The topics looked up: the hit is an object one subscriber watches, the
/// miss an object nobody watches but under the same crowded
/// `neutron.port.` branch.
struct Topics {
    hit: Vec<u8>,
    miss: Vec<u8>,
}

fn topics() -> Topics {
    let mut rng = Rng(0x5eed_0f70_91c5);
    Topics {
        hit: format!("neutron.port.{}.update", rng.uuid()).into_bytes(),
        miss: format!("neutron.port.{}.update", rng.uuid()).into_bytes(),
    }
}

/// The one filter of `kind` that matches the hit topic.
fn hit_filter(kind: FilterKind, hit: &[u8]) -> Filter {
    let hit = std::str::from_utf8(hit).expect("ASCII topic");
    let uuid = hit.split('.').nth(2).expect("neutron.port.<uuid>.update");
    let text = match kind {
        FilterKind::Exact => hit.to_string(),
        FilterKind::Prefix => format!("neutron.port.{uuid}"),
        FilterKind::Pattern => format!("neutron.*.{uuid}.>"),
    };
    Filter::new(kind, text.as_bytes(), MAX_LEN).expect("valid filter")
}

/// Counts the radix nodes whose path is a prefix of `topic`: the nodes an
/// exact/prefix lookup of `topic` visits. Worked out from the filter texts
/// alone, so the report can say why the radix walk gets longer: a node exists
/// where a filter ends or where filters sharing the topic's leading bytes
/// branch.
struct RadixPath {
    topic: Vec<u8>,
    /// Per depth: some filter ends exactly here along the topic.
    ends: Vec<bool>,
    /// Per depth: next bytes taken by filters that leave the topic here.
    leave: Vec<[u64; 4]>,
    /// Deepest depth any filter follows the topic to.
    reach: usize,
}

impl RadixPath {
    fn new(topic: &[u8]) -> RadixPath {
        RadixPath {
            topic: topic.to_vec(),
            ends: vec![false; topic.len() + 1],
            leave: vec![[0; 4]; topic.len() + 1],
            reach: 0,
        }
    }

    fn add(&mut self, text: &[u8]) {
        let common = text
            .iter()
            .zip(&self.topic)
            .take_while(|(a, b)| a == b)
            .count();
        self.reach = self.reach.max(common);
        match text.get(common) {
            None => self.ends[common] = true,
            Some(&byte) => self.leave[common][usize::from(byte >> 6)] |= 1 << (byte & 63),
        }
    }

    fn nodes(&self) -> usize {
        (0..=self.topic.len())
            .filter(|&d| {
                // Filters going deeper continue along the topic's own byte.
                let along = usize::from(d < self.reach);
                let leaving: u32 = self.leave[d].iter().map(|w| w.count_ones()).sum();
                d == 0 || self.ends[d] || along + leaving as usize >= 2
            })
            .count()
    }
}

/// Pushes `n` filters of `kind` that match neither topic, on fresh ids from
/// `*next_id`, skipping texts that start with `avoid`.
#[allow(clippy::too_many_arguments)]
fn add_unrelated(
    index: &mut RoutingIndex,
    kind: FilterKind,
    n: usize,
    topics: &Topics,
    avoid: Option<&[u8]>,
    rng: &mut Rng,
    next_id: &mut SubId,
    paths: &mut [RadixPath],
) {
    let mut added = 0;
    while added < n {
        let filter =
            Filter::new(kind, filter_text(kind, rng).as_bytes(), MAX_LEN).expect("valid filter");
        // A random short prefix can match by chance; the index must hold
        // exactly `n` filters that do not.
        if filter.matches(&topics.hit)
            || filter.matches(&topics.miss)
            || avoid.is_some_and(|a| filter.text().starts_with(a))
        {
            continue;
        }
        assert!(index.insert(&filter, *next_id));
        if kind != FilterKind::Pattern {
            paths.iter_mut().for_each(|p| p.add(filter.text()));
        }
        *next_id += 1;
        added += 1;
    }
}

/// An index of `n` non-matching filters of `kind` plus the hit filter, on
/// `n + 1` distinct subscriber ids. The hit subscriber gets id 0, so the
/// stamp array's far end (the big ids) is what a hit does not touch.
/// Also returns the radix nodes on the hit and the miss topic's paths.
fn build(
    kind: FilterKind,
    n: usize,
    topics: &Topics,
    avoid: Option<&[u8]>,
) -> (RoutingIndex, [usize; 2]) {
    let mut index = RoutingIndex::new();
    let hit = hit_filter(kind, &topics.hit);
    assert!(index.insert(&hit, 0));
    let mut paths = [RadixPath::new(&topics.hit), RadixPath::new(&topics.miss)];
    if kind != FilterKind::Pattern {
        paths.iter_mut().for_each(|p| p.add(hit.text()));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64 ^ ((kind as u64) << 40));
    add_unrelated(
        &mut index, kind, n, topics, avoid, &mut rng, &mut 1, &mut paths,
    );
    check(&mut index, topics);
    (index, paths.map(|p| p.nodes()))
}

/// Fails the bench instead of timing the wrong thing.
fn check(index: &mut RoutingIndex, topics: &Topics) {
    let mut out = Vec::new();
    index.matches(&topics.hit, &mut out);
    assert_eq!(out, [0], "the hit topic must match exactly subscriber 0");
    index.matches(&topics.miss, &mut out);
    assert!(out.is_empty(), "the miss topic must match nothing: {out:?}");
}

/// 100,000 subscribers, each holding one exact, one prefix and one pattern
/// filter, all distinct; subscriber 0 holds the three that match the hit
/// topic and is reported once.
fn build_mixed(subscribers: usize, topics: &Topics) -> RoutingIndex {
    let mut index = RoutingIndex::new();
    for kind in FilterKind::ALL {
        assert!(index.insert(&hit_filter(kind, &topics.hit), 0));
    }
    let mut rng = Rng(0xa076_1d64_78bd_642f);
    for kind in FilterKind::ALL {
        add_unrelated(
            &mut index,
            kind,
            subscribers - 1,
            topics,
            None,
            &mut rng,
            &mut 1,
            &mut [],
        );
    }
    assert_eq!(index.len(), 3 * subscribers);
    check(&mut index, topics);
    index
}

fn lookup(index: &mut RoutingIndex, topic: &[u8], out: &mut Vec<SubId>) {
    index.matches(black_box(topic), out);
    black_box(&*out);
}

/// Nanoseconds per lookup on each of `indexes`: the median and the minimum
/// over many short batches, taken alternately on the two so both see the
/// same background load. On a shared machine a batch that was preempted is
/// only ever slower, so the minimum is the least disturbed figure and the
/// median the typical one.
struct Timing {
    median: [f64; 2],
    min: [f64; 2],
}

fn alternating_timing(mut indexes: [&mut RoutingIndex; 2], topic: &[u8]) -> Timing {
    const BATCHES: usize = 301;
    let mut out = Vec::with_capacity(16);
    // About 200 us per batch: far above the timer's resolution, and well
    // below a scheduler time slice, so most batches run undisturbed.
    let mut per_batch = 100u32;
    loop {
        let start = Instant::now();
        for _ in 0..per_batch {
            lookup(indexes[0], topic, &mut out);
        }
        if start.elapsed() >= Duration::from_micros(200) || per_batch >= 1 << 24 {
            break;
        }
        per_batch *= 2;
    }
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..BATCHES {
        for (which, index) in indexes.iter_mut().enumerate() {
            let start = Instant::now();
            for _ in 0..per_batch {
                lookup(index, topic, &mut out);
            }
            samples[which].push(start.elapsed().as_nanos() as f64 / f64::from(per_batch));
        }
    }
    for s in &mut samples {
        s.sort_by(f64::total_cmp);
    }
    Timing {
        median: [0, 1].map(|i| samples[i][BATCHES / 2]),
        min: [0, 1].map(|i| samples[i][0]),
    }
}

struct Ratio {
    kind: FilterKind,
    case: &'static str,
    /// Non-matching subscriptions in the big index.
    size: usize,
    /// What the big index holds, when not the standard spread.
    variant: &'static str,
    /// Medians (the report's figures) and minima, small and big index.
    small_ns: f64,
    big_ns: f64,
    small_min: f64,
    big_min: f64,
    /// Radix nodes on the topic's path, small and big (exact/prefix only).
    small_nodes: usize,
    big_nodes: usize,
}

fn bench_kind(c: &mut Criterion, kind: FilterKind, topics: &Topics, ratios: &mut Vec<Ratio>) {
    let (mut smallest, smallest_nodes) = build(kind, SIZES[0], topics, None);
    let mut group = c.benchmark_group(format!("matching/{kind}"));
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for size in SIZES {
        let mut big = None;
        if size != SIZES[0] {
            let started = Instant::now();
            let built = build(kind, size, topics, None);
            eprintln!(
                "{kind}: built {} subscriptions ({} trie nodes, {} MiB) in {:.1?}",
                size + 1,
                built.0.node_count(),
                built.0.heap_bytes() >> 20,
                started.elapsed()
            );
            big = Some(built);
        }
        for (which, (case, topic)) in [("hit", &topics.hit), ("miss", &topics.miss)]
            .into_iter()
            .enumerate()
        {
            let index = match big.as_mut() {
                Some((big, _)) => big,
                None => &mut smallest,
            };
            let mut out = Vec::with_capacity(16);
            group.bench_function(BenchmarkId::new(case, size), |b| {
                b.iter(|| lookup(index, topic, &mut out))
            });
            if let Some((big, nodes)) = big.as_mut().filter(|_| !quick_mode()) {
                let t = alternating_timing([&mut smallest, big], topic);
                ratios.push(Ratio {
                    kind,
                    case,
                    size,
                    variant: "",
                    small_ns: t.median[0],
                    big_ns: t.median[1],
                    small_min: t.min[0],
                    big_min: t.min[1],
                    small_nodes: smallest_nodes[which],
                    big_nodes: nodes[which],
                });
            }
        }
        // Dropping a 1M index takes a moment; do it outside any timing.
        drop(big);
    }
    group.finish();

    // Control for the radix kinds: the same million filters kept off the
    // topic's `neutron.` branch. If this stays flat while the standard
    // spread does not, the growth comes from filters sharing the topic's
    // path, not from the index's size.
    if kind != FilterKind::Pattern && !quick_mode() {
        let size = SIZES[SIZES.len() - 1];
        let (mut big, nodes) = build(kind, size, topics, Some(b"neutron."));
        for (which, (case, topic)) in [("hit", &topics.hit), ("miss", &topics.miss)]
            .into_iter()
            .enumerate()
        {
            let t = alternating_timing([&mut smallest, &mut big], topic);
            ratios.push(Ratio {
                kind,
                case,
                size,
                variant: "none under neutron.",
                small_ns: t.median[0],
                big_ns: t.median[1],
                small_min: t.min[0],
                big_min: t.min[1],
                small_nodes: smallest_nodes[which],
                big_nodes: nodes[which],
            });
        }
    }
}

fn bench_mixed(c: &mut Criterion, topics: &Topics) {
    const SUBSCRIBERS: usize = 100_000;
    let mut index = build_mixed(SUBSCRIBERS, topics);
    let mut group = c.benchmark_group("matching/mixed");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (case, topic) in [("hit", &topics.hit), ("miss", &topics.miss)] {
        let mut out = Vec::with_capacity(16);
        group.bench_function(
            BenchmarkId::new(case, format!("{SUBSCRIBERS}subs_x3filters")),
            |b| b.iter(|| lookup(&mut index, topic, &mut out)),
        );
    }
    group.finish();
}

/// The worst case for the pattern walk; see the module docs.
fn bench_pattern_worst_case(c: &mut Criterion) {
    let mut group = c.benchmark_group("pattern_worst_case");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for segments in [16, 64] {
        let mut index = RoutingIndex::new();
        for star in 0..segments - 1 {
            let mut parts = vec!["a"; segments];
            parts[star] = "*";
            parts[segments - 1] = "nomatch";
            let filter = Filter::new(FilterKind::Pattern, parts.join(".").as_bytes(), MAX_LEN)
                .expect("valid filter");
            assert!(index.insert(&filter, star as SubId));
        }
        let hot = vec!["a"; segments].join(".").into_bytes();
        let stem = vec!["a"; segments - 1].join(".");
        let misses: Vec<Vec<u8>> = (0..4 * MATCH_CACHE_CAPACITY)
            .map(|n| format!("{stem}.x{n:04}").into_bytes())
            .collect();
        let mut out = Vec::with_capacity(16);
        for topic in misses.iter().chain([&hot]) {
            index.matches(topic, &mut out);
            assert!(out.is_empty(), "nothing may match");
        }
        assert_eq!(
            index.cache_len(),
            MATCH_CACHE_CAPACITY,
            "costly walks are cached"
        );
        group.bench_function(BenchmarkId::new("hit", segments), |b| {
            b.iter(|| lookup(&mut index, &hot, &mut out))
        });
        let mut next = 0;
        group.bench_function(BenchmarkId::new("miss", segments), |b| {
            b.iter(|| {
                next = (next + 1) % misses.len();
                lookup(&mut index, &misses[next], &mut out)
            })
        });
    }
    group.finish();
}

/// Criterion's own rule: without `--bench` (`cargo test --benches`), or with
/// `--test` or `--list`, the benches only check that they run, and so does
/// the ratio report.
fn quick_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    !has("--bench") || has("--test") || has("--list")
}

fn main() {
    let topics = topics();
    let mut c = Criterion::default().configure_from_args();
    let mut ratios = Vec::new();
    for kind in FilterKind::ALL {
        bench_kind(&mut c, kind, &topics, &mut ratios);
    }
    bench_mixed(&mut c, &topics);
    bench_pattern_worst_case(&mut c);
    c.final_summary();

    if ratios.is_empty() {
        return;
    }
    println!();
    println!(
        "Per-lookup cost against the same lookup with {} subscriptions \
         (medians of 301 alternating batches):",
        SIZES[0]
    );
    for r in &ratios {
        let nodes = if r.kind == FilterKind::Pattern {
            String::new()
        } else {
            format!(
                "  radix nodes on path {:>2} vs {:>2}",
                r.big_nodes, r.small_nodes
            )
        };
        println!(
            "  {:<8} {:<5} {:>9} subs: {:>6.1} ns vs {:>6.1} ns at {}  ratio {:>5.2} (of minima {:>5.2}){nodes}  {}",
            r.kind.as_str(),
            r.case,
            r.size,
            r.big_ns,
            r.small_ns,
            SIZES[0],
            r.big_ns / r.small_ns,
            r.big_min / r.small_min,
            r.variant,
        );
    }
    println!();
    println!("Report: per-lookup time at 1M divided by the time at 10 (flat cost = 1):");
    for r in ratios
        .iter()
        .filter(|r| r.size == SIZES[SIZES.len() - 1] && r.variant.is_empty())
    {
        println!(
            "  ratio 1M/10  {:<8} {:<5} {:>5.2}  ({:.1} ns / {:.1} ns; ratio of minima {:.2})",
            r.kind.as_str(),
            r.case,
            r.big_ns / r.small_ns,
            r.big_ns,
            r.small_ns,
            r.big_min / r.small_min
        );
    }
}
