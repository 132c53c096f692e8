import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import SluiceModel
import SluiceTLS

/// The config API's listener (15017): HTTPS with the control plane's certificate from the mesh CA, client
/// certificates requested (optional) and verified against the mesh root, HTTP/1.1 requests handed to ``ConfigAPI``;
/// watches streamed as chunked newline-delimited JSON events.
public final class APIServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let api: ConfigAPI
    let names: TLSServerNames
    /// Seconds between BOOKMARK events on watches that asked for them.
    let bookmarkInterval: TimeAmount

    public init(api: ConfigAPI, certificateChain: String, privateKey: String, clientCA: String,
                threads: Int = 2, bookmarkInterval: TimeAmount = .seconds(15)) throws {
        self.api = api
        self.bookmarkInterval = bookmarkInterval
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let context = try TLSContext(certificateChain: certificateChain, privateKey: privateKey, clientCA: clientCA,
                                     clientCertificateOptional: true, minVersion: .v1_2)
        names = TLSServerNames([.init(hosts: ["*"], context: context)])
    }

    /// Binds `host:port` and serves; returns the bound port.
    public func start(host: String, port: Int) throws -> Int {
        let api = self.api, names = self.names, interval = bookmarkInterval
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelInitializer { channel in
                do {
                    let tls = TLSChannelHandler(try TLSStream(serving: names))
                    // A client that sends nothing for 30 s (a stalled handshake, head or body) is cut; a watch
                    // only receives, so its connection is exempt once it streams.
                    return channel.pipeline.addHandlers([IdleStateHandler(readTimeout: .seconds(30)), tls]).flatMap {
                        channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true)
                    }.flatMap {
                        channel.pipeline.addHandler(Handler(api: api, tls: tls, bookmarkInterval: interval))
                    }
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let channel = try bootstrap.bind(host: host, port: port).wait()
        return channel.localAddress?.port ?? port
    }

    public func shutdown() { try? group.syncShutdownGracefully() }

    final class Handler: ChannelInboundHandler, @unchecked Sendable {
        // @unchecked: every member is touched on the channel's event loop only.
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        let api: ConfigAPI
        let tls: TLSChannelHandler
        let bookmarkInterval: TimeAmount
        var head: HTTPRequestHead?
        var body = Data()
        var tooLarge = false
        /// The watch this connection streams, once it is one.
        var watchID: Int?
        var bookmarks: RepeatedTask?

        init(api: ConfigAPI, tls: TLSChannelHandler, bookmarkInterval: TimeAmount) {
            self.api = api
            self.tls = tls
            self.bookmarkInterval = bookmarkInterval
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h):
                head = h
                body = Data()
                tooLarge = false
            case .body(var b):
                // Twice the object limit: the API answers 413 with its Status; past that the bytes are dropped.
                if body.count + b.readableBytes > 2 * ConfigAPI.maxObjectBytes {
                    tooLarge = true
                    body = Data(count: ConfigAPI.maxObjectBytes + 1)
                } else if !tooLarge {
                    body.append(contentsOf: b.readBytes(length: b.readableBytes) ?? [])
                }
            case .end:
                guard let h = head, watchID == nil else { return }
                head = nil
                var headers: [String: String] = [:]
                for (name, value) in h.headers { headers[name.lowercased()] = value }
                let request = ConfigAPI.Request(method: h.method.rawValue, target: h.uri, headers: headers, body: body,
                                                peer: tls.peerURIs.first)
                body = Data()
                switch api.handle(request) {
                case .response(let r): respond(context, r, keepAlive: h.isKeepAlive, head: h.method == .HEAD)
                case .watch(let w): startWatch(context, w)
                case .deferred(let work):
                    // Off the event loop; the answer is written back on it (the pipeline holds later requests of
                    // this connection until then).
                    let keepAlive = h.isKeepAlive
                    let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                    let loop = context.eventLoop
                    Task {
                        let r = await work()
                        loop.execute { bound.value.0.respond(bound.value.1, r, keepAlive: keepAlive) }
                    }
                }
            }
        }

        func respond(_ context: ChannelHandlerContext, _ r: ConfigAPI.Response, keepAlive: Bool, head: Bool = false) {
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: r.contentType)
            headers.add(name: "content-length", value: String(r.body.count))
            headers.add(name: "cache-control", value: "no-cache, private")
            for w in r.warnings {
                // Kubernetes' form; the text is quoted, so quotes and line ends inside it are escaped.
                let text = w.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                    .replacingOccurrences(of: "\n", with: " ")
                headers.add(name: "warning", value: "299 - \"\(text)\"")
            }
            if !keepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: r.status),
                                                                 headers: headers))), promise: nil)
            if !head { context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: r.body)))), promise: nil) }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive { done.whenComplete { _ in context.close(promise: nil) } }
        }

        // MARK: - watch

        /// Events a slow client may leave unread before its watch is ended (it lists again, as clients do).
        static let maxQueued = 10_000

        func startWatch(_ context: ChannelHandlerContext, _ w: ConfigAPI.Watch) {
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "cache-control", value: "no-cache, private")
            headers.add(name: "transfer-encoding", value: "chunked")
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                                  promise: nil)
            let loop = context.eventLoop
            let channel = context.channel
            let queued = Atomic<Int>(0)
            let apiVersion = w.resource.group + "/" + w.version
            let deliver: @Sendable ([StoreChange]) -> Bool = { changes in
                var lines = Data()
                var n = 0
                for c in changes {
                    guard w.name == nil || c.object.key.name == w.name,
                          w.selector.matches(c.object.object["metadata"]?["labels"]?.stringMap ?? [:])
                    else { continue }
                    var o = c.object.object
                    o["apiVersion"] = .string(apiVersion)
                    if w.table { o = Table.list(w.resource, [o], revision: c.revision) }
                    lines.append(JSONValue.object(["type": .string(c.kind.rawValue), "object": o]).data)
                    lines.append(0x0a)
                    n += 1
                }
                if n == 0 { return true }
                if queued.add(n, ordering: .relaxed).newValue > Self.maxQueued {
                    channel.close(promise: nil)
                    return false
                }
                loop.execute {
                    let buffer = channel.allocator.buffer(bytes: lines)
                    channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(buffer))).whenComplete { _ in
                        queued.subtract(n, ordering: .relaxed)
                    }
                }
                return true
            }
            guard let id = api.mesh.watch(w.resource, namespace: w.namespace, from: w.start, deliver: deliver) else {
                let expired = APIStatus(code: 410, reason: "Expired",
                                        message: "too old resource version: the history kept starts after it; list again")
                var line = JSONValue.object(["type": "ERROR", "object": expired.json]).data
                line.append(0x0a)
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: line)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
                return
            }
            watchID = id
            if w.bookmarks {
                let mesh = api.mesh, r = w.resource
                bookmarks = loop.scheduleRepeatedTask(initialDelay: bookmarkInterval, delay: bookmarkInterval) { _ in
                    let object: JSONValue = .object(["kind": .string(r.kind), "apiVersion": .string(apiVersion),
                                                     "metadata": .object(["resourceVersion": .string(String(mesh.revision))])])
                    var line = JSONValue.object(["type": "BOOKMARK", "object": object]).data
                    line.append(0x0a)
                    channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(channel.allocator.buffer(bytes: line))),
                                          promise: nil)
                }
            }
            if let t = w.timeout {
                let ns = t.components.seconds * 1_000_000_000 + t.components.attoseconds / 1_000_000_000
                loop.scheduleTask(in: .nanoseconds(ns)) {
                    channel.writeAndFlush(HTTPServerResponsePart.end(nil)).whenComplete { _ in channel.close(promise: nil) }
                }
            }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is IdleStateHandler.IdleStateEvent {
                if watchID == nil { context.close(promise: nil) }
            } else {
                context.fireUserInboundEventTriggered(event)
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            if let id = watchID { api.mesh.unwatch(id) }
            watchID = nil
            bookmarks?.cancel()
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}
