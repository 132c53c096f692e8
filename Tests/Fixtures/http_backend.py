#!/usr/bin/env python3
"""HTTP/1.1 test backends on loopback (keep-alive). Each argument NAME:PORT starts one server that answers:

  /status/CODE          that status, body NAME
  /flaky/KEY/N          503 for the first N requests with that KEY, then 200 (a backend that recovers)
  /delay/MS             200 after MS milliseconds
  /headers              200, body: the request's headers, one "name: value" per line (lower-case names)
  /echo                 200, body: the request body (Content-Length or chunked)
  /drop                 close the connection without answering
  /half                 announce 1000 bytes, send 10, close (a response cut short)
  /chunked              200 with a chunked body of three chunks
  /upgrade              101 Switching Protocols (Upgrade: echo), then echo raw bytes until the client closes
  anything else         200, body NAME
A server whose NAME starts with "fail" answers every request with 503.

Prints "ports P1 P2 ..." then "ready". Port 0 picks a free port.
"""
import http.server
import socketserver
import sys
import threading
import time

counts = {}
lock = threading.Lock()


def handler_for(name):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Head and body leave in separate writes: without TCP_NODELAY the body waits for a delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length", "0"))
            return self.rfile.read(n) if n else b""

        def reply(self, code, data, extra=()):
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-backend", name)
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def handle_any(self):
            req = self.body()
            parts = self.path.split("?")[0].split("/")
            if name.startswith("fail"):
                return self.reply(503, name.encode())
            if len(parts) >= 2 and parts[1] == "upgrade":
                self.send_response(101)
                self.send_header("Upgrade", "echo")
                self.send_header("Connection", "Upgrade")
                self.end_headers()
                self.wfile.flush()
                while True:
                    data = self.connection.recv(65536)
                    if not data:
                        break
                    self.connection.sendall(data)
                self.close_connection = True
                return
            if len(parts) >= 3 and parts[1] == "status":
                return self.reply(int(parts[2]), name.encode())
            if len(parts) >= 4 and parts[1] == "flaky":
                key, n = parts[2], int(parts[3])
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                    seen = counts[key]
                return self.reply(503 if seen <= n else 200, f"{name} attempt {seen}".encode())
            if len(parts) >= 3 and parts[1] == "delay":
                time.sleep(int(parts[2]) / 1000)
                return self.reply(200, name.encode())
            if len(parts) >= 2 and parts[1] == "headers":
                text = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())
                return self.reply(200, text.encode())
            if len(parts) >= 2 and parts[1] == "echo":
                return self.reply(200, req)
            if len(parts) >= 2 and parts[1] == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if len(parts) >= 2 and parts[1] == "half":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if len(parts) >= 2 and parts[1] == "chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in (b"one-", b"two-", b"three"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
                return
            return self.reply(200, name.encode())

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default listen backlog of 5 drops SYNs when a proxy opens tens of pooled connections at once.
    request_queue_size = 1024


def main(specs):
    ports = []
    for spec in specs:
        name, port = spec.split(":")
        srv = Server(("127.0.0.1", int(port)), handler_for(name))
        ports.append(srv.server_address[1])
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ports " + " ".join(map(str, ports)), flush=True)
    print("ready", flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
