// libFuzzer entry point for the HTTP/1.1 wire layer (`make fuzz`): request and response head parsing, and the
// streaming reader fed the same bytes in pieces whose sizes the input chooses (so every split of a head, a
// chunk-size line or a trailer is reached). Any crash, hang or unbounded growth is a bug.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzHTTP1(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let piece = Int(data[0] % 32) + 1
    let bytes = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    var limits = HTTP1Limits()
    limits.maxHeadBytes = 4096
    limits.maxHeaderCount = 32
    limits.maxURIBytes = 1024
    _ = HTTP1Parser.parseRequestHead(bytes, limits: limits)
    _ = HTTP1Parser.parseResponseHead(bytes, requestMethodIsHEAD: data[0] & 0x80 != 0, limits: limits)
    for framed in [false, true] {
        var requests = HTTP1RequestReader(limits: limits)
        requests.framedBody = framed
        var responses = HTTP1ResponseReader(limits: limits)
        responses.framedBody = framed
        var offset = 0
        var stuck = 0
        while offset < bytes.count && stuck < 4 {
            let end = min(bytes.count, offset + piece)
            let chunk = UnsafeRawBufferPointer(rebasing: bytes[offset..<end])
            var sawEnd = false, failed = false
            let used = requests.feed(chunk) { event in
                switch event {
                case .body(let r): precondition(r.lowerBound >= 0 && r.upperBound <= chunk.count, "body range out of the chunk")
                case .end: sawEnd = true
                case .error: failed = true
                case .head: break
                }
            }
            _ = responses.feed(chunk) { _ in }
            precondition(used <= chunk.count)
            if failed { break }
            if sawEnd { requests.next() }
            stuck = used == 0 ? stuck + 1 : 0
            offset += used
        }
    }
    return 0
}
