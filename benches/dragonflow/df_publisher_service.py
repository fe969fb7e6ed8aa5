"""Dragonflow's df-publisher-service, as Dragonflow writes it, without OpenStack.

Dragonflow (``dragonflow/controller/df_publisher_service.py`` with the
``zmq_pubsub_multiproc_driver``): the neutron-server workers PUSH
``[topic, pack_message(update.to_dict())]`` to an ipc socket; the service's
``ZMQSubscriberMultiprocAgent`` binds a PULL there and, for each message,
does ``[topic, data] = recv_multipart()``, ``unpack_message(data)`` and hands
the fields to a callback that builds a ``DbUpdate`` and queues it; the
service's main loop takes it off the queue and its ``ZMQPublisherAgent``
(a PUB socket bound on ``[df] publisher_port``) does
``send_multipart([topic, pack_message(update.to_dict())])``, the topic being
the update's own. pack/unpack are msgpack.

Here the same, in one plain thread: no eventlet, hence no queue hop between
two greenthreads (which could only add cost). Sockets keep libzmq's defaults,
as Dragonflow does (it sets no high-water mark): so the PUB drops what a
SUB's pipe of 1,000 messages cannot hold.

    python df_publisher_service.py IPC_ENDPOINT PUB_ENDPOINT

Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys

import msgpack
import zmq


class DbUpdate:
    """dragonflow.db.db_common.DbUpdate, the fields the service carries."""

    __slots__ = ("action", "key", "table", "topic", "ts", "value")

    def __init__(self, table, key, action, value, topic, ts):
        self.table = table
        self.key = key
        self.action = action
        self.value = value
        self.topic = topic
        self.ts = ts  # the benchmark's send stamp, carried like any field

    def to_dict(self):
        return {
            "ts": self.ts,
            "table": self.table,
            "key": self.key,
            "action": self.action,
            "value": self.value,
            "topic": self.topic,
        }


def pack_message(message):
    return msgpack.packb(message, use_bin_type=True)


def unpack_message(message):
    return msgpack.unpackb(message, raw=False)


def main(argv):
    ipc_endpoint, pub_endpoint = argv[1], argv[2]
    stop = []

    def on_signal(_signo, _frame):
        stop.append(True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    context = zmq.Context()
    inproc_server = context.socket(zmq.PULL)
    inproc_server.bind(ipc_endpoint)
    socket = context.socket(zmq.PUB)
    socket.bind(pub_endpoint)
    poller = zmq.Poller()
    poller.register(inproc_server, zmq.POLLIN)
    print("ready", flush=True)
    while not stop:
        # Dragonflow blocks in recv_multipart(); the poll's timeout is only
        # there so that a signal stops the loop within 100 ms.
        if not poller.poll(100):
            continue
        while not stop:
            try:
                [topic, data] = inproc_server.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            message = unpack_message(data)
            update = DbUpdate(
                message["table"],
                message["key"],
                message["action"],
                message["value"],
                message["topic"],
                message["ts"],
            )
            topic = update.topic.encode("utf-8")
            socket.send_multipart([topic, pack_message(update.to_dict())])
    socket.close(linger=0)
    inproc_server.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
