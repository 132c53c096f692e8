import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import SluiceTLS

/// `sluice control`'s listener (15012): TLS with the control plane's own certificate, client certificates
/// requested and verified against the mesh root (optional: joining nodes have none yet), HTTP/1.1 requests
/// handed to ``CAService``.
public final class ControlServer: Sendable {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let service: CAService
    let names: TLSServerNames

    /// - Parameters:
    ///   - certificateChain, privateKey: PEM files of the control plane's serving certificate.
    ///   - clientCA: the trust bundle client (node) certificates must chain to.
    public init(service: CAService, certificateChain: String, privateKey: String, clientCA: String) throws {
        self.service = service
        let context = try TLSContext(certificateChain: certificateChain, privateKey: privateKey, clientCA: clientCA,
                                     clientCertificateOptional: true, minVersion: .v1_3)
        names = TLSServerNames([.init(hosts: ["*"], context: context)])
    }

    /// Binds `host:port` and serves; returns the bound port.
    public func start(host: String, port: Int) throws -> Int {
        let service = self.service, names = self.names
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                do {
                    let tls = TLSChannelHandler(try TLSStream(serving: names))
                    // A client that says nothing for 10 s (a slow handshake or request) is cut.
                    return channel.pipeline.addHandlers([IdleStateHandler(readTimeout: .seconds(10)), CloseWhenIdle(), tls]).flatMap {
                        channel.pipeline.configureHTTPServerPipeline()
                    }.flatMap {
                        channel.pipeline.addHandler(RequestHandler(service: service, tls: tls))
                    }
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let channel = try bootstrap.bind(host: host, port: port).wait()
        return channel.localAddress?.port ?? port
    }

    public func shutdown() { try? group.syncShutdownGracefully() }

    final class CloseWhenIdle: ChannelInboundHandler, Sendable {
        typealias InboundIn = NIOAny
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
        }
    }

    final class RequestHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let service: CAService
        let tls: TLSChannelHandler
        var head: HTTPRequestHead?
        var body = Data()
        static let maxBody = 64 << 10

        init(service: CAService, tls: TLSChannelHandler) {
            self.service = service
            self.tls = tls
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h):
                head = h
                body = Data()
            case .body(var b):
                guard body.count + b.readableBytes <= Self.maxBody else {
                    respond(context, .init(status: 413, body: "{\"error\":\"request too large\",\"reason\":\"too_large\"}"))
                    head = nil
                    return
                }
                body.append(contentsOf: b.readBytes(length: b.readableBytes) ?? [])
            case .end:
                guard let h = head else { return }
                head = nil
                let path = String(h.uri.split(separator: "?", maxSplits: 1).first ?? "")
                respond(context, service.handle(method: h.method.rawValue, path: path, body: body, peer: tls.peerURIs.first),
                        close: !h.isKeepAlive)
            }
        }

        private func respond(_ context: ChannelHandlerContext, _ r: CAService.Response, close: Bool = true) {
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: String(r.body.utf8.count))
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: r.status),
                                                                 headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: r.body)))), promise: nil)
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if close { done.whenComplete { _ in context.close(promise: nil) } }
        }
    }
}
