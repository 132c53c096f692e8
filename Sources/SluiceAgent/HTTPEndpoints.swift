import NIOCore
import NIOHTTP1
import NIOPosix

/// Small HTTP/1.1 servers for the control path: Prometheus `/metrics` (15020), readiness `/healthz/ready`
/// (15021), admin (15000). They run on a NIO event loop thread, never on a data-plane worker.
public final class HTTPEndpoints: Sendable {
    public typealias Route = @Sendable (_ method: String, _ path: String) -> (status: Int, contentType: String, body: String)?

    let group: MultiThreadedEventLoopGroup
    public init() { group = MultiThreadedEventLoopGroup(numberOfThreads: 1) }

    /// Binds `address` (HOST:PORT) and serves `route`. Returns the bound port.
    public func serve(_ address: String, route: @escaping Route) throws -> Int {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
            throw EndpointError("'\(address)' is not HOST:PORT")
        }
        var host = String(address[..<colon])
        if host.hasPrefix("[") { host = String(host.dropFirst().dropLast()) }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMap {
                    channel.pipeline.addHandler(Handler(route: route))
                }
            }
        do {
            let ch = try bootstrap.bind(host: host, port: port).wait()
            return ch.localAddress?.port ?? port
        } catch let e as IOError where e.errnoCode == EADDRINUSE {
            throw EndpointError("cannot listen on \(address): address already in use; stop the process that holds it (ss -ltnp) or pass another address")
        } catch let e as IOError where e.errnoCode == EACCES {
            throw EndpointError("cannot listen on \(address): permission denied; run as root or grant CAP_NET_BIND_SERVICE")
        }
    }

    public func shutdown() { try? group.syncShutdownGracefully() }

    public struct EndpointError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    final class Handler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let route: Route
        var head: HTTPRequestHead?
        init(route: @escaping Route) { self.route = route }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body: break
            case .end:
                guard let h = head else { return }
                let path = String(h.uri.split(separator: "?", maxSplits: 1).first ?? "")
                let answer = route(h.method.rawValue, path) ?? (404, "text/plain", "not found\n")
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: answer.contentType)
                headers.add(name: "Content-Length", value: String(answer.body.utf8.count))
                let status = HTTPResponseStatus(statusCode: answer.status)
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status,
                                                                     headers: headers))), promise: nil)
                var buf = context.channel.allocator.buffer(capacity: answer.body.utf8.count)
                buf.writeString(answer.body)
                context.write(wrapOutboundOut(.body(.byteBuffer(buf))), promise: nil)
                let keepAlive = h.isKeepAlive
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                    if !keepAlive { channel.close(promise: nil) }
                }
                head = nil
            }
        }
    }
}
