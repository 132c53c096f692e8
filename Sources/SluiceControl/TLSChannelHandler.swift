import NIOCore
import SluiceTLS

/// TLS for NIO channels on Sluice's own TLS layer (OpenSSL over memory BIOs, as the data plane uses it), so the
/// control plane needs no second TLS stack: ciphertext in, plaintext up the pipeline; plaintext down, records out.
final class TLSChannelHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let tls: TLSStream
    /// The peer's certificate URI SANs, once the handshake is done.
    private(set) var peerURIs: [String] = []
    private var plain = [UInt8](repeating: 0, count: 16 << 10)

    init(_ tls: TLSStream) { self.tls = tls }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        buffer.withUnsafeReadableBytes { tls.receive($0) }
        buffer.moveReaderIndex(to: buffer.writerIndex)
        if !tls.handshakeDone {
            switch tls.handshake() {
            case .needInput:
                flushRecords(context)
                return
            case .failed:
                flushRecords(context)
                context.close(promise: nil)
                return
            case .done:
                peerURIs = tls.peerURIs
                flushRecords(context)
                context.fireUserInboundEventTriggered(TLSHandshakeDone(peerURIs: peerURIs))
            }
        }
        while true {
            let result = plain.withUnsafeMutableBytes { tls.read(into: $0) }
            switch result {
            case .bytes(let n):
                context.fireChannelRead(wrapInboundOut(context.channel.allocator.buffer(bytes: plain[0..<n])))
            case .needInput:
                flushRecords(context)
                return
            case .closed, .failed:
                context.close(promise: nil)
                return
            }
        }
    }

    /// Plaintext written since the last flush, and the writes' promises: a response's head, body and end go out as
    /// one TLS record in one write, not three.
    private var unflushed: ByteBuffer?
    private var promises: [EventLoopPromise<Void>] = []

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var buffer = unwrapOutboundIn(data)
        if unflushed == nil { unflushed = buffer } else { unflushed!.writeBuffer(&buffer) }
        if let promise { promises.append(promise) }
    }

    func flush(context: ChannelHandlerContext) {
        if let pending = unflushed {
            unflushed = nil
            pending.withUnsafeReadableBytes { _ = tls.write($0) }
        }
        let waiting = promises
        promises = []
        guard !waiting.isEmpty else { return flushRecords(context) }
        let done = context.eventLoop.makePromise(of: Void.self)
        for p in waiting { done.futureResult.cascade(to: p) }
        flushRecords(context, promise: done)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        let waiting = promises
        promises = []
        for p in waiting { p.fail(ChannelError.ioOnClosedChannel) }
    }

    private func flushRecords(_ context: ChannelHandlerContext, promise: EventLoopPromise<Void>? = nil) {
        let n = tls.pendingOutput
        guard n > 0 else {
            promise?.succeed(())
            return
        }
        var out = context.channel.allocator.buffer(capacity: n)
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { tls.takeOutput(into: $0) }
        context.writeAndFlush(wrapOutboundOut(out), promise: promise)
    }
}

/// Fired up the pipeline when the handshake completes, with the client's verified identity.
struct TLSHandshakeDone {
    let peerURIs: [String]
}
