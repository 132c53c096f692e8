extension HTTPRoute {
    static let retryConditions: Set<String> = [
        "5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx", "refused-stream",
        "retriable-status-codes", "retriable-headers", "cancelled", "deadline-exceeded", "internal",
        "resource-exhausted", "unavailable", "http3-post-connect-failure",
    ]

    static func decode(_ r: YAMLReader) -> HTTPRoute? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout", "retries",
                     "fault", "mirror", "mirrorPercentage", "mirrorPercent", "mirrors", "corsPolicy", "headers"])
        r.notEnforced(["corsPolicy", "delegate", "mirrors", "mirrorPercent"],
                      hint: "mirror with mirror and mirrorPercentage; CORS headers come from the application")
        let matches = r.array("match").compactMap { HTTPMatch.decode($0) }
        let route = VirtualService.RouteDestination.decodeList(r)
        let redirect = r.child("redirect").flatMap { HTTPRedirect.decode($0) }
        let direct = r.child("directResponse").flatMap { DirectResponse.decode($0) }
        let actions = [!route.isEmpty, redirect != nil, direct != nil].filter { $0 }.count
        if actions == 0 && r.child("delegate") == nil {
            r.sink.error(r.path, r.line, "an http route needs one of route, redirect or directResponse")
        } else if actions > 1 {
            r.sink.error(r.path, r.line, "route, redirect and directResponse are mutually exclusive",
                         hint: "split them into separate http routes")
        }
        var rewrite: HTTPRewrite?
        if let w = r.child("rewrite"), w.expectMapping() {
            w.checkKeys(["uri", "authority", "uriRegexRewrite"])
            rewrite = HTTPRewrite(uri: w.string("uri"), authority: w.string("authority"))
            if let rx = w.child("uriRegexRewrite"), rx.expectMapping() {
                rx.checkKeys(["match", "rewrite"])
                if let m = rx.requiredString("match"), checkRegex(m, rx.child("match")!) {
                    rewrite?.uriRegexRewrite = .init(match: m, rewrite: rx.string("rewrite") ?? "")
                }
                if w.child("uri") != nil {
                    w.sink.error(w.path, w.line, "uri and uriRegexRewrite are mutually exclusive")
                }
            }
            if redirect != nil { r.sink.error("\(r.path).rewrite", w.line, "rewrite cannot be combined with redirect") }
        }
        var retries: HTTPRetry?
        if let rt = r.child("retries"), rt.expectMapping() {
            rt.checkKeys(["attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "backoff"])
            let on = (rt.string("retryOn") ?? "").split(separator: ",").map { String($0).trimmingSpaces() }.filter { !$0.isEmpty }
            for c in on where !retryConditions.contains(c) && Int(c).map({ !(100...599).contains($0) }) ?? true {
                rt.sink.error("\(rt.path).retryOn", rt.child("retryOn")?.line, "'\(c)' is not a retry condition",
                              hint: "use Envoy's conditions (5xx, gateway-error, connect-failure, reset, ...) or status codes")
            }
            retries = HTTPRetry(attempts: rt.int("attempts", in: 0...1000) ?? 0, perTryTimeout: rt.duration("perTryTimeout"),
                                retryOn: on)
        }
        var fault: HTTPFault?
        if let f = r.child("fault"), f.expectMapping() {
            f.checkKeys(["delay", "abort"])
            fault = HTTPFault()
            if let d = f.child("delay"), d.expectMapping() {
                d.checkKeys(["fixedDelay", "exponentialDelay", "percentage", "percent"])
                if let fixed = d.duration("fixedDelay") {
                    fault?.delay = .init(fixedDelay: fixed, percentage: percentage(d) ?? 100)
                } else if d.child("fixedDelay") == nil {
                    d.sink.error("\(d.path).fixedDelay", d.line, "a delay fault needs fixedDelay")
                }
            }
            if let a = f.child("abort"), a.expectMapping() {
                a.checkKeys(["httpStatus", "grpcStatus", "http2Error", "percentage"])
                if let status = a.int("httpStatus", in: 200...599) {
                    fault?.abort = .init(kind: .httpStatus(status), percentage: percentage(a) ?? 100)
                } else if let grpc = a.string("grpcStatus") {
                    fault?.abort = .init(kind: .grpcStatus(grpc), percentage: percentage(a) ?? 100)
                } else if a.child("httpStatus") == nil {
                    a.sink.error(a.path, a.line, "an abort fault needs httpStatus or grpcStatus")
                }
            }
            if fault?.delay == nil && fault?.abort == nil { fault = nil }
        }
        var mirror: VirtualService.Destination?
        if let m = r.child("mirror"), m.expectMapping() {
            m.checkKeys(["host", "subset", "port"])
            if let host = m.requiredString("host") {
                var port: UInt16?
                if let p = m.child("port"), p.expectMapping() { port = p.port("number") }
                mirror = .init(host: host, subset: m.string("subset"), port: port)
            }
        }
        var mirrorPct: Double?
        if let mp = r.child("mirrorPercentage"), mp.expectMapping() { mirrorPct = mp.double("value", in: 0...100) }
        return HTTPRoute(name: r.string("name"), match: matches, route: route, redirect: redirect, directResponse: direct,
                         rewrite: rewrite, timeout: r.duration("timeout"), retries: retries, fault: fault, mirror: mirror,
                         mirrorPercentage: mirrorPct, headers: r.child("headers").flatMap { HeaderOperations.decode($0) })
    }

    /// Istio's `percentage: {value: 12.5}`; the deprecated integer `percent` is accepted too.
    static func percentage(_ r: YAMLReader) -> Double? {
        if let p = r.child("percentage"), p.expectMapping() {
            p.checkKeys(["value"])
            return p.double("value", in: 0...100)
        }
        return r.int("percent", in: 0...100).map(Double.init)
    }
}

func checkRegex(_ pattern: String, _ r: YAMLReader) -> Bool {
    do {
        _ = try Regex(pattern)
        return true
    } catch {
        r.sink.error(r.path, r.line, "'\(pattern)' is not a valid regular expression", hint: "Istio uses RE2 syntax")
        return false
    }
}

extension StringMatch {
    static func decode(_ r: YAMLReader) -> StringMatch? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["exact", "prefix", "regex"])
        let present = ["exact", "prefix", "regex"].filter { r.child($0) != nil }
        guard present.count == 1 else {
            r.sink.error(r.path, r.line, present.isEmpty ? "a string match needs exact, prefix or regex"
                                                          : "exact, prefix and regex are mutually exclusive")
            return nil
        }
        if let v = r.string("exact") { return .exact(v) }
        if let v = r.string("prefix") { return .prefix(v) }
        if let v = r.string("regex"), checkRegex(v, r.child("regex")!) { return .regex(v) }
        return nil
    }

    static func decodeMap(_ parent: YAMLReader, _ key: String) -> [String: StringMatch] {
        guard let m = parent.child(key), m.expectMapping() else { return [:] }
        var out: [String: StringMatch] = [:]
        for p in m.pairs {
            let name = p.key
            guard let v = m.child(name) else { continue }
            if let sm = decode(v) { out[key == "headers" || key == "withoutHeaders" ? name.lowercased() : name] = sm }
        }
        return out
    }
}

extension HTTPMatch {
    static func decode(_ r: YAMLReader) -> HTTPMatch? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels", "gateways",
                     "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "statPrefix"])
        return HTTPMatch(name: r.string("name"), uri: r.child("uri").flatMap { StringMatch.decode($0) },
                         scheme: r.child("scheme").flatMap { StringMatch.decode($0) },
                         method: r.child("method").flatMap { StringMatch.decode($0) },
                         authority: r.child("authority").flatMap { StringMatch.decode($0) },
                         headers: StringMatch.decodeMap(r, "headers"),
                         withoutHeaders: StringMatch.decodeMap(r, "withoutHeaders"),
                         queryParams: StringMatch.decodeMap(r, "queryParams"), port: r.port("port"),
                         sourceLabels: r.stringMap("sourceLabels"), gateways: r.strings("gateways"),
                         ignoreUriCase: r.bool("ignoreUriCase") ?? false)
    }
}

extension HTTPRedirect {
    static let codes: Set<Int> = [301, 302, 303, 307, 308]
    static func decode(_ r: YAMLReader) -> HTTPRedirect? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["uri", "authority", "port", "derivePort", "scheme", "redirectCode"])
        let code = r.int("redirectCode", in: 300...399) ?? 301
        if !codes.contains(code) {
            r.sink.error("\(r.path).redirectCode", r.child("redirectCode")?.line, "\(code) is not a redirect status",
                         hint: "use 301, 302, 303, 307 or 308")
        }
        return HTTPRedirect(uri: r.string("uri"), authority: r.string("authority"), port: r.port("port"),
                            scheme: r.string("scheme"), redirectCode: code)
    }
}

extension DirectResponse {
    static func decode(_ r: YAMLReader) -> DirectResponse? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["status", "body"])
        guard let status = r.int("status", in: 200...599) else {
            if r.child("status") == nil { r.sink.error("\(r.path).status", r.line, "required field 'status' is missing") }
            return nil
        }
        var body: String?
        if let b = r.child("body"), b.expectMapping() {
            b.checkKeys(["string", "bytes"])
            body = b.string("string") ?? b.string("bytes")
        }
        return DirectResponse(status: status, body: body)
    }
}

extension HeaderOperations {
    static func decode(_ r: YAMLReader) -> HeaderOperations? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["request", "response"])
        func ops(_ key: String) -> Ops? {
            guard let o = r.child(key), o.expectMapping() else { return nil }
            o.checkKeys(["set", "add", "remove"])
            return Ops(set: o.stringMap("set"), add: o.stringMap("add"), remove: o.strings("remove"))
        }
        return HeaderOperations(request: ops("request"), response: ops("response"))
    }
}
