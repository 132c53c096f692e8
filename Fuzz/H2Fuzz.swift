// libFuzzer entry point for the HTTP/2 path (`make fuzz`): a server session fed the client preface and then
// arbitrary frames, in pieces whose sizes the input picks, with every event acted on the way the proxy does
// (responses submitted, bodies queued and finished, streams consumed and reset). Any crash or hang is a bug.
import CSluiceLinux

let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzH2(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let piece = Int(data[0] % 64) + 1
    let session = H2Session(server: true)
    preface.withUnsafeBytes { _ = session.receive($0) }
    var offset = 1
    var rounds = 0
    while offset < size && rounds < 10_000 {
        rounds += 1
        let end = min(size, offset + piece)
        let ok = session.receive(UnsafeRawBufferPointer(start: data + offset, count: end - offset))
        offset = end
        for e in session.takeEvents() {
            switch e {
            case .headers(let s, _, let endStream):
                session.respond(stream: s, H2Fields([(":status", "200"), ("x", "y")]), endStream: false)
                if endStream { session.finish(stream: s, trailers: H2Fields([("grpc-status", "0")])) }
            case .data(let s, let bytes):
                bytes.withUnsafeBytes { session.send(stream: s, $0) }
                session.consume(stream: s, bytes: bytes.count)
            case .end(let s):
                session.finish(stream: s)
            case .trailers(let s, _):
                session.reset(stream: s)
            default:
                break
            }
        }
        _ = session.takeOutput()
        if !ok { break }
    }
    return 0
}
