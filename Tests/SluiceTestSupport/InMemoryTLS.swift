import SluiceTLS

/// Two TLS sessions back to back in memory, for tests: records go from one to the other until neither has
/// anything to say.
public enum InMemoryTLS {
    /// Moves everything `from` has to send into `to`, in chunks of `chunk` bytes.
    public static func move(_ from: TLSStream, _ to: TLSStream, chunk: Int = 4096) {
        var buf = [UInt8](repeating: 0, count: chunk)
        while from.pendingOutput > 0 {
            let n = buf.withUnsafeMutableBytes { from.takeOutput(into: $0) }
            buf.withUnsafeBytes { to.receive(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
    }

    /// Runs the handshake between `server` and `client`; returns each side's last progress.
    @discardableResult
    public static func handshake(_ server: TLSStream, _ client: TLSStream) -> (server: TLSStream.Progress,
                                                                                client: TLSStream.Progress) {
        var sp = TLSStream.Progress.needInput
        var cp = client.handshake()
        for _ in 0..<20 {
            move(client, server)
            sp = server.handshake()
            move(server, client)
            cp = client.handshake()
            move(client, server)
            if case .failed = sp { break }
            if case .failed = cp { break }
            if sp == .done && cp == .done && client.pendingOutput == 0 && server.pendingOutput == 0 { break }
        }
        return (sp, cp)
    }
}
