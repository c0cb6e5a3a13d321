#!/usr/bin/env python3
"""An independent HBONE peer for interop tests: PyPI's `h2` plus the standard `ssl` module.

Nothing here shares code with Ferry. It speaks HBONE as ../shared/design/hbone.md describes it.

  hbone_peer.py client --connect IP:PORT --cert C --key K --ca ROOT [--request REQUEST]...
      REQUEST is METHOD,AUTHORITY[,PAYLOAD]; prints one JSON object per request:
      {"status": 200, "headers": {...}, "echo": "..."}; first a line {"server_identity": "spiffe://..."}
  hbone_peer.py server --listen IP:PORT --cert C --key K --ca ROOT
      prints {"listening": true}, then per CONNECT {"client_identity", "pseudo", "headers"} and
      answers 200, echoing the stream's bytes back and ending when the client ends
      (--answer-after-data: once the stream's first bytes arrived; --never-answer: never, while
      still answering pings; --greet-then-reset CODE: a greeting line, then RST_STREAM CODE).
      Prints {"reset": STREAM_ID, "error_code": N} when a client resets.
"""
import argparse
import json
import socket
import ssl
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events


def emit(obj):
    print(json.dumps(obj), flush=True)


def uri_san(cert):
    uris = [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]
    return uris[0] if len(uris) == 1 else None


def context(args, server):
    """TLS 1.3, certificate required both ways, ALPN h2 (the client may offer other or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    alpn = getattr(args, "alpn", "h2")
    if alpn != "none":
        ctx.set_alpn_protocols(alpn.split(","))
    return ctx


def pump(sock, conn):
    data = conn.data_to_send()
    if data:
        sock.sendall(data)


def idle(sock, seconds):
    """Says nothing after the TLS handshake (not even the HTTP/2 preface); reports when the
    server closed the connection, if it did within `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        emit({"closed_after": round(time.monotonic() - started, 3)})
    except socket.timeout:
        emit({"still_open_after": seconds})
    except (ssl.SSLError, OSError) as e:
        emit({"closed_after": round(time.monotonic() - started, 3), "error": str(e)})


def client(args):
    host, port = args.connect.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock = context(args, server=False).wrap_socket(raw)
    except (ssl.SSLError, OSError) as e:
        emit({"tls_error": str(e)})
        return
    peer = sock.getpeercert()
    emit({"server_identity": uri_san(peer), "serial": peer.get("serialNumber"),
          "alpn": sock.selected_alpn_protocol(), "tls": sock.version()})
    if args.idle is not None:
        idle(sock, args.idle)
        return
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    pump(sock, conn)
    for spec in args.requests:
        method, authority, *rest = spec.split(",", 2)
        payload = rest[0].encode() if rest else b""
        stream = conn.get_next_available_stream_id()
        headers = [(":method", method), (":authority", authority)]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        headers += [("forwarded", 'for="192.0.2.9:4000"'), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00")]
        conn.send_headers(stream, headers, end_stream=method != "CONNECT")
        pump(sock, conn)
        result = {"request": spec, "status": None, "headers": {}, "echo": ""}
        echo = b""
        done = False
        while not done:
            try:
                data = sock.recv(65536)
            except (ssl.SSLError, OSError) as e:
                result["error"] = str(e)
                break
            if not data:
                result["error"] = "connection closed"
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    hdrs = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                            for k, v in event.headers}
                    result["status"] = int(hdrs.pop(":status"))
                    result["headers"] = hdrs
                    if result["status"] == 200:
                        conn.send_data(stream, payload, end_stream=True)
                    elif not event.stream_ended:
                        conn.reset_stream(stream)
                        done = True
                    if event.stream_ended:
                        done = True
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    echo += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    result["reset"] = int(event.error_code)
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    result["error"] = "GOAWAY"
                    done = True
            pump(sock, conn)
        result["echo"] = echo.decode(errors="replace")
        emit(result)
    conn.close_connection()
    pump(sock, conn)
    sock.close()


def serve_connection(sock, answer_after_data, never_answer, greet_then_reset):
    client_identity = uri_san(sock.getpeercert())
    # CONNECT streams not answered yet: with --answer-after-data, until their first bytes arrive.
    unanswered = set()
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    pump(sock, conn)
    while True:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, OSError):
            return
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                pseudo, headers = {}, {}
                for k, v in event.headers:
                    k = k.decode() if isinstance(k, bytes) else k
                    v = v.decode() if isinstance(v, bytes) else v
                    (pseudo if k.startswith(":") else headers)[k] = v
                emit({"client_identity": client_identity, "pseudo": pseudo, "headers": headers,
                      "header_order": [k.decode() if isinstance(k, bytes) else k for k, _ in event.headers]})
                status = "200" if pseudo.get(":method") == "CONNECT" else "400"
                if status == "200" and never_answer:
                    continue
                if status == "200" and greet_then_reset is not None:
                    conn.send_headers(event.stream_id, [(":status", "200")])
                    conn.send_data(event.stream_id, b"220 sandbox ready\n")
                    conn.reset_stream(event.stream_id, error_code=greet_then_reset)
                    continue
                if status == "200" and answer_after_data:
                    unanswered.add(event.stream_id)
                else:
                    conn.send_headers(event.stream_id, [(":status", status)], end_stream=status != "200")
            elif isinstance(event, h2.events.StreamReset):
                emit({"reset": event.stream_id, "error_code": int(event.error_code)})
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if never_answer:
                    continue
                if event.stream_id in unanswered:
                    unanswered.discard(event.stream_id)
                    emit({"answered_after_bytes": len(event.data)})
                    conn.send_headers(event.stream_id, [(":status", "200")])
                if event.data:
                    conn.send_data(event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded):
                if never_answer:
                    continue
                if event.stream_id in unanswered:
                    unanswered.discard(event.stream_id)
                    conn.send_headers(event.stream_id, [(":status", "200")])
                conn.end_stream(event.stream_id)
        pump(sock, conn)


def server(args):
    host, port = args.listen.rsplit(":", 1)
    ctx = context(args, server=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(64)
    emit({"listening": True})
    while True:
        raw, _ = listener.accept()
        try:
            sock = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            emit({"tls_error": str(e)})
            continue
        threading.Thread(target=serve_connection, args=(sock, args.answer_after_data, args.never_answer, args.greet_then_reset), daemon=True).start()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["client", "server"])
    parser.add_argument("--connect")
    parser.add_argument("--listen")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--request", dest="requests", action="append", default=[])
    parser.add_argument("--alpn", default="h2", help="comma-separated ALPN to offer, or none")
    parser.add_argument("--idle", type=float, help="client: stay silent after TLS for this long")
    parser.add_argument("--answer-after-data", action="store_true",
                        help="server: answer a CONNECT only once its first bytes have arrived")
    parser.add_argument("--never-answer", action="store_true",
                        help="server: never answer a CONNECT (pings still are)")
    parser.add_argument("--greet-then-reset", type=int, metavar="CODE",
                        help="server: answer a CONNECT with 200 and a greeting line, then RST_STREAM CODE")
    args = parser.parse_args()
    (client if args.mode == "client" else server)(args)


if __name__ == "__main__":
    sys.exit(main())
