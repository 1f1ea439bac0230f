#!/usr/bin/env python3
"""A client of the agentreg agent protocol (agentreg/1) in Python, written from
docs/protocol.md alone: a second implementation beside the Rust AgentClient, and a check
that the document is enough to write one.

Needs Python 3.9+ and aioquic (pip install aioquic).

    python3 agentreg_client.py --ca ca.pem --node 127.0.0.1:7101 --agent-id my-agent

runs a conformance walk through one agent's life against a node: claim (with a claim token),
the same claim sent again, a rival claim, validation, registration, answering the node's
pings, a tampered certificate, release. It prints one JSON object per step and exits 0 when
every answer is the one the protocol promises, 1 otherwise. With --move and more than one
--node, it also waits after registering for its node to go (stop it: the node closes the
connection with 0x103) and carries on at the next node: it reconnects there and registers
again with its certificate. A request a node answers with clock_skew, shutting_down or
connection_closing (it did nothing) is sent again at the next node. Agent (with
AgentConnection and connect_any under it) is the part to reuse in an agent of your own.
"""

import argparse
import asyncio
import contextlib
import json
import secrets
import struct
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived

ALPN = "agentreg/1"
SERVER_NAME = "agentreg"
MAX_FRAME = 65536


def frame(message):
    """One frame: a 4-byte big-endian length, then one UTF-8 JSON object."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if not 1 <= len(body) <= MAX_FRAME:
        raise ValueError(f"a frame holds 1 to {MAX_FRAME} bytes, not {len(body)}")
    return struct.pack(">I", len(body)) + body


def read_frame(buf):
    """The JSON object of the first whole frame in `buf`, or None while it is incomplete."""
    if len(buf) < 4:
        return None
    (n,) = struct.unpack(">I", bytes(buf[:4]))
    if not 1 <= n <= MAX_FRAME:
        raise ValueError(f"frame length {n} is out of bounds")
    if len(buf) < 4 + n:
        return None
    return json.loads(bytes(buf[4 : 4 + n]).decode())


class Refused(Exception):
    """The node answered success: false. `code` is what to match on; `error` is for people."""

    def __init__(self, answer):
        self.answer = answer
        # Nodes of builds before codes send the text alone.
        self.code = answer.get("code", "unrecognized")
        self.error = answer.get("error", "")
        super().__init__(f"{self.code}: {self.error}")


class AgentConnection(QuicConnectionProtocol):
    """One QUIC connection to a node: a request per client-opened stream, and answers to the
    pings the node sends on streams it opens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = {}  # our streams: id -> (bytes so far, future of the answer)
        self._incoming = {}  # the node's streams: id -> bytes so far
        self._next_request_id = 1
        self.pings_answered = 0
        # (QUIC error code, reason) once the connection has ended.
        self.ended = asyncio.get_running_loop().create_future()

    async def keep_alive(self, every=1.0):
        """Sends a QUIC PING every `every` seconds, for as long as it runs: the node sends no
        keep-alives and closes a connection it hears nothing on for its agent timeout. Run
        it as a task beside a long-lived registration. It ends with the connection."""
        while not self.ended.done():
            await asyncio.sleep(every)
            try:
                await self.ping()
            except ConnectionError:
                return

    async def request(self, command, **fields):
        """Sends one request and returns its answer; raises Refused on success: false."""
        message = {"type": "system_request", "command": command, "request_id": self._next_request_id}
        self._next_request_id += 1
        message.update(fields)
        stream_id = self._quic.get_next_available_stream_id()
        answer = self._loop.create_future()
        self._pending[stream_id] = (bytearray(), answer)
        # Write the frame and finish the send side at once.
        self._quic.send_stream_data(stream_id, frame(message), end_stream=True)
        self.transmit()
        reply = await answer
        if reply.get("type") != "system_response" or reply.get("request_id") != message["request_id"]:
            raise ValueError(f"not the answer to request {message['request_id']}: {reply}")
        if reply.get("success") is not True:
            raise Refused(reply)
        return reply

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            if event.stream_id in self._pending:
                self._answer_arrived(event)
            else:
                self._node_request_arrived(event)
        elif isinstance(event, ConnectionTerminated):
            for _, answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(f"connection closed: {event.error_code:#x} {event.reason_phrase}"))
            self._pending.clear()
            if not self.ended.done():
                self.ended.set_result((event.error_code, event.reason_phrase))

    def _answer_arrived(self, event):
        buf, answer = self._pending[event.stream_id]
        buf += event.data
        # Read on to the end of the stream (the node finishes right after its frame):
        # dropping it earlier costs a STOP_SENDING packet.
        if event.end_stream:
            del self._pending[event.stream_id]
            if not answer.done():
                try:
                    reply = read_frame(buf)
                    if reply is None:
                        raise ValueError("stream ended inside a frame")
                    answer.set_result(reply)
                except ValueError as e:
                    answer.set_exception(e)

    def _node_request_arrived(self, event):
        buf = self._incoming.setdefault(event.stream_id, bytearray())
        buf += event.data
        request = read_frame(buf)
        if request is None:
            return
        del self._incoming[event.stream_id]
        answer = {"type": "system_response", "command": request.get("command"), "success": False}
        if "request_id" in request:
            answer["request_id"] = request["request_id"]
        if request.get("command") == "ping_agent":
            answer.update(success=True, timestamp=request.get("timestamp"))
            self.pings_answered += 1
        else:
            answer.update(code="unknown_command", error="agents answer only ping_agent")
        self._quic.send_stream_data(event.stream_id, frame(answer), end_stream=True)
        self.transmit()


# Close codes after which an agent goes to another node (docs/protocol.md, "Close codes"):
# the node is shutting down (0x103) or holds as many agents as it may (0x104).
MOVE_ON = (0x103, 0x104)


async def connect_any(stack, nodes, config):
    """Connects to the first of `nodes` ("host:port") that takes the connection, and returns
    (node, AgentConnection); the connection closes with `stack` (a contextlib.AsyncExitStack).
    A node may refuse a connection (past its handshake limit: QUIC CONNECTION_REFUSED) or
    close it unread (0x103 while it drains, 0x104 when full): then the next is tried."""
    failures = []
    for node in nodes:
        host, port = node.rsplit(":", 1)
        try:
            conn = await stack.enter_async_context(
                connect(host, int(port), configuration=config, create_protocol=AgentConnection)
            )
        except (ConnectionError, OSError) as e:
            failures.append(f"{node}: {e}")
            continue
        if conn.ended.done() and conn.ended.result()[0] in MOVE_ON:
            failures.append(f"{node}: closed {conn.ended.result()[0]:#x}")
            continue
        return node, conn
    raise ConnectionError("no node took the connection: " + "; ".join(failures))


# Answers after which a request is sent as it is to another node: the node did nothing with
# it (docs/protocol.md, "Error codes").
SEND_ELSEWHERE = ("clock_skew", "shutting_down", "connection_closing")


class Agent:
    """An agent's link to the cluster: one connection at a time, to the first of `nodes`
    that takes it, kept alive. A request the node answers with one of SEND_ELSEWHERE is sent
    again, as it is, on the next node (a claim carries its claim token, so sending it again
    is safe in any case)."""

    def __init__(self, stack, nodes, config):
        self._stack = stack
        self._nodes = nodes
        self._config = config
        self.node = None
        self.conn = None

    async def connect(self):
        """Connects to the first node that takes the connection, starting after the current
        one (so a node that refused a request is tried last)."""
        start = self._nodes.index(self.node) + 1 if self.node in self._nodes else 0
        order = self._nodes[start:] + self._nodes[:start]
        if self.conn is not None and not self.conn.ended.done():
            self.conn.close()
        self.node, self.conn = await connect_any(self._stack, order, self._config)
        self._stack.push_async_callback(cancelled, asyncio.ensure_future(self.conn.keep_alive(0.2)))

    async def request(self, command, **fields):
        """Each node is asked at most once; the last refusal is raised."""
        for attempt in range(len(self._nodes)):
            try:
                return await self.conn.request(command, **fields)
            except Refused as r:
                if r.code not in SEND_ELSEWHERE or attempt == len(self._nodes) - 1:
                    raise
                print(json.dumps({"moved": {"from": self.node, "because": r.code}}), flush=True)
            await self.connect()


def configuration(ca_file, server_name):
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    config.load_verify_locations(cafile=ca_file)
    # Our own idle timeout: a node silent this long is taken for gone (keep_alive keeps the
    # connection busy from our side).
    config.idle_timeout = 30.0
    return config


class Walk:
    """The conformance walk: each step prints its answer and checks what was promised."""

    def __init__(self):
        self.failures = []

    def step(self, name, answer, **promised):
        print(json.dumps({"step": name, "answer": answer}), flush=True)
        for key, want in promised.items():
            got = answer.get(key)
            if got != want:
                self.failures.append(f"{name}: {key} is {got!r}, not {want!r}")

    async def refused(self, name, request, code):
        try:
            answer = await request
        except Refused as r:
            self.step(name, r.answer, code=code)
            return r.answer
        self.step(name, answer, success=False)
        return answer


async def walk(args):
    w = Walk()
    async with contextlib.AsyncExitStack() as stack:
        agent = Agent(stack, args.node, configuration(args.ca, args.server_name))
        await agent.connect()
        cert = await agents_life(agent, args, w)
    print(json.dumps({"certificate": cert, "failures": w.failures}), flush=True)
    return 0 if not w.failures else 1


async def cancelled(task):
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def agents_life(agent, args, w):
    """The walk's steps; returns the certificate it was issued (and released)."""
    agent_id = args.agent_id
    token = secrets.token_hex(16)
    claim = await agent.request("claim_agent_id", agent_id=agent_id, claim_token=token)
    w.step("claim", claim, success=True, agent_id=agent_id, repeated=False)
    cert = claim["certificate"]

    again = await agent.request("claim_agent_id", agent_id=agent_id, claim_token=token)
    w.step("the same claim sent again", again, repeated=True, certificate=cert)

    await w.refused(
        "a rival claim",
        agent.request("claim_agent_id", agent_id=agent_id, claim_token=secrets.token_hex(16)),
        "already_claimed",
    )

    valid = await agent.request("validate_certificate", certificate=cert)
    w.step("validate", valid, valid=True, agent_id=agent_id)

    reg = await agent.request("register_agent", agent_id=agent_id, certificate=cert, metadata={"lang": "python"})
    w.step("register", reg, success=True, agent_id=agent_id, took_over=False)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.ping_patience
    while agent.conn.pings_answered < 2 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    w.step("answer the node's pings", {"pings_answered": agent.conn.pings_answered})
    if agent.conn.pings_answered < 2:
        w.failures.append(f"answered {agent.conn.pings_answered} pings in {args.ping_patience} s, not 2")

    if args.move:
        await move(agent, args, w, agent_id, cert)

    tampered = dict(cert, serial=cert["serial"] + 1)
    bad = await agent.request("validate_certificate", certificate=tampered, consistency="local")
    w.step("validate a tampered certificate", bad, valid=False, code="certificate_bad_signature")

    await w.refused("an unknown command", agent.request("fly_away"), "unknown_command")
    await w.refused("a malformed request", agent.request("claim_agent_id", agent_id=7), "bad_request")

    released = await agent.request("release_agent_id", agent_id=agent_id, certificate=cert)
    w.step("release", released, success=True, agent_id=agent_id, serial=cert["serial"])

    gone = await agent.request("validate_certificate", certificate=cert)
    w.step("validate after the release", gone, valid=False, code="certificate_revoked")
    return cert


async def move(agent, args, w, agent_id, cert):
    """Waits for the node to close the connection, then registers at the next node with the
    certificate: a node that stops hands its sessions back, so the id is free to register
    elsewhere at once."""
    print(json.dumps({"waiting": "for the node to go", "node": agent.node}), flush=True)
    try:
        code, reason = await asyncio.wait_for(asyncio.shield(agent.conn.ended), args.move_patience)
    except asyncio.TimeoutError:
        w.failures.append(f"{agent.node} did not close the connection within {args.move_patience} s")
        return
    w.step("the node goes", {"code": code, "reason": reason}, code=0x103)
    await agent.connect()
    # took_over is true if the old node's hand-back has not been committed yet: the
    # certificate then takes the session over.
    reg = await agent.request("register_agent", agent_id=agent_id, certificate=cert)
    w.step("register on another node", reg, success=True, agent_id=agent_id)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ca", required=True, help="the cluster CA, PEM")
    p.add_argument(
        "--node",
        required=True,
        action="append",
        help="host:port of a node's agent endpoint; give it once per node, the first tried first",
    )
    p.add_argument("--agent-id", default="python-agent")
    p.add_argument("--server-name", default=SERVER_NAME)
    p.add_argument(
        "--ping-patience",
        type=float,
        default=70.0,
        help="seconds to wait for two pings (a node pings every [heartbeat] interval_ms, 30 s by default)",
    )
    p.add_argument("--move", action="store_true", help="after registering, wait for the node to go, then go on at the next")
    p.add_argument("--move-patience", type=float, default=30.0, help="seconds to wait for the node to go")
    args = p.parse_args()
    sys.exit(asyncio.run(walk(args)))


if __name__ == "__main__":
    main()
