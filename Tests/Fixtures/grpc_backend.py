#!/usr/bin/env python3
"""gRPC test fixture (Python grpcio, raw bytes, no generated code).

  grpc_backend.py serve NAME[:PORT] ...   servers; prints "ports P1 ..." then "ready"
      /test.Echo/Unary      returns NAME + ":" + request
      /test.Echo/Fail       aborts with NOT_FOUND, details "missing"
      /test.Echo/Stream     streams N messages (N = int(request)), each NAME + ":" + index
      /test.Echo/Flaky      request "KEY:N": UNAVAILABLE for the first N calls with that KEY, then
                            NAME + ":attempt " + count
      /grpc.health.v1.Health/Check   SERVING for service "" and "test.Echo" (NOT_SERVING when NAME starts
                            with "sick"), NOT_FOUND for other services (hand-encoded protobuf)
  grpc_backend.py call TARGET METHOD PAYLOAD [key=value ...]
      one call through TARGET (host:port); prints "OK <reply>" (streams: replies joined by ","),
      or "ERR <CODE> <details>"
  grpc_backend.py cancel TARGET
      starts /test.Echo/Stream of 1,000,000 messages, reads 10, cancels it (RST_STREAM), then makes a unary
      call on the same channel; prints "CANCELLED <n read>" and that call's result
"""
import sys
import threading
import time
from concurrent import futures

import grpc

calls = {}
lock = threading.Lock()


def serve(specs):
    servers, ports = [], []
    for spec in specs:
        name, _, port = spec.partition(":")

        def unary(request, context, name=name):
            return name.encode() + b":" + request

        def fail(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "missing")

        def flaky(request, context, name=name):
            key, _, n = request.decode().partition(":")
            with lock:
                calls[key] = calls.get(key, 0) + 1
                seen = calls[key]
            if seen <= int(n or "0"):
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
            return f"{name}:attempt {seen}".encode()

        def stream(request, context, name=name):
            for i in range(int(request or b"0")):
                yield f"{name}:{i}".encode()

        def check(request, context, name=name):
            # HealthCheckRequest{string service = 1}: 0x0A, length, bytes (names here are short).
            service = request[2:].decode() if request[:1] == b"\x0a" else ""
            if service not in ("", "test.Echo"):
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            # HealthCheckResponse{status = 1}: SERVING = 1, NOT_SERVING = 2.
            return b"\x08\x02" if name.startswith("sick") else b"\x08\x01"

        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        })
        health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(check),
        })
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((handler, health))
        ports.append(server.add_insecure_port(f"127.0.0.1:{port or 0}"))
        server.start()
        servers.append(server)
    print("ports " + " ".join(map(str, ports)), flush=True)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def call(target, method, payload, metadata):
    with grpc.insecure_channel(target) as channel:
        try:
            if method.endswith("/Stream"):
                replies = channel.unary_stream(method)(payload.encode(), metadata=metadata, timeout=10)
                print("OK " + ",".join(r.decode() for r in replies))
            else:
                reply = channel.unary_unary(method)(payload.encode(), metadata=metadata, timeout=10)
                print("OK " + reply.decode())
        except grpc.RpcError as e:
            print(f"ERR {e.code().name} {e.details()}")


def cancel(target):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream("/test.Echo/Stream")(b"1000000", timeout=20)
        n = 0
        for _ in call:
            n += 1
            if n == 10:
                break
        call.cancel()
        print(f"CANCELLED {n}")
        try:
            print("OK " + channel.unary_unary("/test.Echo/Unary")(b"after", timeout=10).decode())
        except grpc.RpcError as e:
            print(f"ERR {e.code().name} {e.details()}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2:])
    elif sys.argv[1] == "cancel":
        cancel(sys.argv[2])
    else:
        md = [tuple(kv.split("=", 1)) for kv in sys.argv[5:]]
        call(sys.argv[2], sys.argv[3], sys.argv[4], md)
