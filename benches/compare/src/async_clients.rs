//! Redis (`redis` crate), NATS (`async-nats`) and MQTT (`rumqttc`, QoS 0)
//! clients. Every subscriber is its own connection served by a tokio task
//! on a two-worker runtime (never a thread each); publishers run on their
//! own threads.
//!
//! How each client batches, as its documentation recommends for throughput:
//! - Redis: the publisher pipelines `PUBLISH` commands: written 64 per
//!   `write`, replies read behind a window of 4,096 (see `RedisPub`);
//!   subscribers use the async `PubSub` stream.
//! - NATS: `Client::publish` queues into the client's connection task, which
//!   writes in batches by itself; `flush` at the end of a run.
//! - MQTT: rumqttc's event loop writes each QoS 0 PUBLISH as it comes (it
//!   flushes per request; the client offers no batching).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::servers::Server;
use crate::session::{PubSink, Subs, runtime, wait_subscribed};
use crate::shared::Shared;
use crate::util::now_ns;
use crate::workload::Workload;

const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Redis: commands written per `write` (the pipeline batch).
pub const REDIS_BATCH: usize = 64;
/// Redis: most replies left unread before the publisher waits for them.
pub const REDIS_WINDOW: usize = 4096;

/// A pipelining Redis publisher on the crate's synchronous connection:
/// `PUBLISH` commands are packed (RESP, no allocation) into batches of
/// `REDIS_BATCH` and written with `send_packed_command`; replies are read
/// with `recv_response` only when more than `REDIS_WINDOW` are outstanding
/// and at the end of a run, so neither flat-out nor paced publishing waits
/// for a round trip per batch.
struct RedisPub {
    con: redis::Connection,
    buf: Vec<u8>,
    batched: usize,
    outstanding: usize,
    topics: Vec<Vec<u8>>,
}

impl RedisPub {
    fn write_batch(&mut self) {
        if self.batched == 0 {
            return;
        }
        self.con
            .send_packed_command(&self.buf)
            .expect("redis write");
        self.outstanding += self.batched;
        self.batched = 0;
        self.buf.clear();
        while self.outstanding > REDIS_WINDOW {
            self.con.recv_response().expect("redis reply");
            self.outstanding -= 1;
        }
    }
}

fn resp_bulk(buf: &mut Vec<u8>, bytes: &[u8]) {
    use std::io::Write;
    let _ = write!(buf, "${}\r\n", bytes.len());
    buf.extend_from_slice(bytes);
    buf.extend_from_slice(b"\r\n");
}

impl PubSink for RedisPub {
    fn send(&mut self, topic: usize, payload: &[u8]) {
        self.buf.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
        let t = std::mem::take(&mut self.topics[topic]);
        resp_bulk(&mut self.buf, &t);
        self.topics[topic] = t;
        resp_bulk(&mut self.buf, payload);
        self.batched += 1;
        if self.batched >= REDIS_BATCH {
            self.write_batch();
        }
    }

    fn flush(&mut self) {
        self.write_batch();
    }

    fn finish(&mut self) {
        self.write_batch();
        while self.outstanding > 0 {
            self.con.recv_response().expect("redis reply");
            self.outstanding -= 1;
        }
    }
}

pub fn open_redis(
    wl: &Workload,
    server: &mut Server,
    shared: &Arc<Shared>,
) -> Result<(Vec<Box<dyn PubSink>>, Subs), String> {
    let url = format!("redis://127.0.0.1:{}/", server.ports[0]);
    let rt = runtime();
    let mut tasks = Vec::new();
    for s in 0..wl.subs {
        let topics = wl.sub_topics(s);
        let shared = Arc::clone(shared);
        let url = url.clone();
        tasks.push(rt.spawn(async move {
            // Redis closes a subscriber that overruns its output buffer
            // limit; reconnect and subscribe again, like a real client.
            let mut first = true;
            loop {
                let run = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut ps = client.get_async_pubsub().await?;
                    for t in &topics {
                        ps.subscribe(t).await?;
                    }
                    if first {
                        first = false;
                        shared
                            .subscribed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let mut stream = ps.into_on_message();
                    while let Some(m) = stream.next().await {
                        shared.on_payload(s, s, m.get_payload_bytes(), now_ns());
                    }
                    Ok::<(), redis::RedisError>(())
                };
                if let Err(e) = run.await {
                    eprintln!("redis subscriber {s}: {e}");
                }
                shared
                    .disconnects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    wait_subscribed(shared, wl.subs, SETUP_TIMEOUT)?;
    let mut pubs: Vec<Box<dyn PubSink>> = Vec::new();
    for p in 0..wl.pubs {
        let con = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("redis publisher: {e}"))?;
        pubs.push(Box::new(RedisPub {
            con,
            buf: Vec::with_capacity(REDIS_BATCH * 1200),
            batched: 0,
            outstanding: 0,
            topics: wl
                .warm_topics(p)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        }));
    }
    Ok((pubs, Subs::Tasks(Arc::clone(shared), Some(rt), tasks)))
}

struct NatsPub {
    client: async_nats::Client,
    handle: tokio::runtime::Handle,
    topics: Vec<async_nats::Subject>,
}

impl PubSink for NatsPub {
    fn send(&mut self, topic: usize, payload: &[u8]) {
        let subject = self.topics[topic].clone();
        let body = bytes::Bytes::copy_from_slice(payload);
        self.handle
            .block_on(self.client.publish(subject, body))
            .expect("nats publish");
    }

    fn flush(&mut self) {
        self.handle
            .block_on(self.client.flush())
            .expect("nats flush");
    }
}

pub fn open_nats(
    wl: &Workload,
    server: &mut Server,
    shared: &Arc<Shared>,
) -> Result<(Vec<Box<dyn PubSink>>, Subs), String> {
    let addr_of = |node: usize| format!("127.0.0.1:{}", server.node_port(node, 0));
    let rt = runtime();
    let mut tasks = Vec::new();
    for s in 0..wl.subs {
        let topics = wl.sub_topics(s);
        let shared = Arc::clone(shared);
        let addr = addr_of(wl.sub_node(s));
        tasks.push(rt.spawn(async move {
            let run = async {
                let client = async_nats::ConnectOptions::new()
                    .connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut streams = Vec::new();
                for t in topics {
                    streams.push(client.subscribe(t).await.map_err(|e| e.to_string())?);
                }
                client.flush().await.map_err(|e| e.to_string())?;
                shared
                    .subscribed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut all = futures::stream::select_all(streams);
                while let Some(m) = all.next().await {
                    shared.on_payload(s, s, &m.payload, now_ns());
                }
                drop(client);
                Ok::<(), String>(())
            };
            if let Err(e) = run.await {
                eprintln!("nats subscriber {s}: {e}");
            }
        }));
    }
    wait_subscribed(shared, wl.subs, SETUP_TIMEOUT)?;
    let mut pubs: Vec<Box<dyn PubSink>> = Vec::new();
    for p in 0..wl.pubs {
        let client = rt
            .block_on(async_nats::ConnectOptions::new().connect(addr_of(wl.pub_node(p))))
            .map_err(|e| format!("nats publisher: {e}"))?;
        pubs.push(Box::new(NatsPub {
            client,
            handle: rt.handle().clone(),
            topics: wl
                .warm_topics(p)
                .into_iter()
                .map(async_nats::Subject::from)
                .collect(),
        }));
    }
    Ok((pubs, Subs::Tasks(Arc::clone(shared), Some(rt), tasks)))
}

struct MqttPub {
    client: Option<rumqttc::Client>,
    topics: Vec<String>,
    closing: Arc<std::sync::atomic::AtomicBool>,
    driver: Option<std::thread::JoinHandle<()>>,
}

impl PubSink for MqttPub {
    fn send(&mut self, topic: usize, payload: &[u8]) {
        self.client
            .as_ref()
            .expect("open")
            .publish(
                self.topics[topic].clone(),
                rumqttc::QoS::AtMostOnce,
                false,
                payload.to_vec(),
            )
            .expect("mqtt publish");
    }
}

impl Drop for MqttPub {
    fn drop(&mut self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = self.client.take() {
            let _ = c.disconnect();
        }
        if let Some(t) = self.driver.take() {
            let _ = t.join();
        }
    }
}

fn mqtt_options(id: String, port: u16) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

pub fn open_mqtt(
    wl: &Workload,
    server: &mut Server,
    shared: &Arc<Shared>,
) -> Result<(Vec<Box<dyn PubSink>>, Subs), String> {
    use rumqttc::{Event, Packet, QoS};
    let port = server.ports[0];
    let pid = std::process::id();
    let rt = runtime();
    let mut tasks = Vec::new();
    for s in 0..wl.subs {
        let topics = wl.sub_topics(s);
        let shared = Arc::clone(shared);
        let opts = mqtt_options(format!("cmp-{pid}-{}-sub-{s}", wl.name), port);
        tasks.push(rt.spawn(async move {
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
            for t in &topics {
                if let Err(e) = client.subscribe(t.clone(), QoS::AtMostOnce).await {
                    eprintln!("mqtt subscriber {s}: {e}");
                    return;
                }
            }
            let mut acks = 0;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        shared.on_payload(s, s, &p.payload, now_ns());
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if acks >= topics.len() => {
                        // Reconnected with a clean session: subscribe again.
                        shared
                            .disconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        for t in &topics {
                            let _ = client.try_subscribe(t.clone(), QoS::AtMostOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks += 1;
                        if acks == topics.len() {
                            shared
                                .subscribed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("mqtt subscriber {s}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    wait_subscribed(shared, wl.subs, SETUP_TIMEOUT)?;
    let mut pubs: Vec<Box<dyn PubSink>> = Vec::new();
    for p in 0..wl.pubs {
        let opts = mqtt_options(format!("cmp-{pid}-{}-pub-{p}", wl.name), port);
        let (client, mut connection) = rumqttc::Client::new(opts, 1024);
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closing2 = Arc::clone(&closing);
        let driver = std::thread::Builder::new()
            .name(format!("mqtt-pub-{p}"))
            .spawn(move || {
                for event in connection.iter() {
                    if let Err(e) = event {
                        if closing2.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        match e {
                            rumqttc::ConnectionError::RequestsDone => break,
                            e => {
                                eprintln!("mqtt publisher: {e}");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                        }
                    }
                }
            })
            .expect("spawn mqtt driver");
        pubs.push(Box::new(MqttPub {
            client: Some(client),
            closing,
            topics: wl.warm_topics(p),
            driver: Some(driver),
        }));
    }
    Ok((pubs, Subs::Tasks(Arc::clone(shared), Some(rt), tasks)))
}
