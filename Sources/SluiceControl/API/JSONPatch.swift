import SluiceModel

/// The two patch formats the Kubernetes API takes for custom resources.
enum JSONPatch {
    /// RFC 7386 JSON merge patch: objects merge member by member, `null` removes, anything else replaces.
    static func merge(_ target: JSONValue, _ patch: JSONValue) -> JSONValue {
        guard case .object(let p) = patch else { return patch }
        var t = target.objectValue ?? [:]
        for (k, v) in p {
            if v == .null { t[k] = nil } else { t[k] = merge(t[k] ?? .null, v) }
        }
        return .object(t)
    }

    struct Failure: Error {
        var message: String
    }

    /// RFC 6902 JSON patch: a list of `add`, `remove`, `replace`, `move`, `copy` and `test` operations with RFC 6901
    /// pointers, applied in order; any failing operation fails the whole patch.
    static func apply(_ target: JSONValue, _ patch: JSONValue) throws(Failure) -> JSONValue {
        guard case .array(let ops) = patch else { throw Failure(message: "a JSON patch must be a list of operations") }
        var doc = target
        for (i, op) in ops.enumerated() {
            guard let name = op["op"]?.stringValue else { throw Failure(message: "operation \(i) has no \"op\"") }
            guard let path = op["path"]?.stringValue else { throw Failure(message: "operation \(i) has no \"path\"") }
            let pointer = try parse(path, i)
            func value() throws(Failure) -> JSONValue {
                guard let v = op["value"] else { throw Failure(message: "operation \(i) (\(name)) has no \"value\"") }
                return v
            }
            func from() throws(Failure) -> [String] {
                guard let f = op["from"]?.stringValue else { throw Failure(message: "operation \(i) (\(name)) has no \"from\"") }
                return try parse(f, i)
            }
            switch name {
            case "add": doc = try edit(doc, pointer[...], .add(try value()), i)
            case "remove": doc = try edit(doc, pointer[...], .remove, i)
            case "replace": doc = try edit(doc, pointer[...], .replace(try value()), i)
            case "move":
                let source = try from()
                guard let v = get(doc, source[...]) else { throw Failure(message: "operation \(i): \"from\" names nothing") }
                if pointer.starts(with: source), pointer.count > source.count {
                    throw Failure(message: "operation \(i): cannot move a value into itself")
                }
                doc = try edit(edit(doc, source[...], .remove, i), pointer[...], .add(v), i)
            case "copy":
                guard let v = get(doc, try from()[...]) else { throw Failure(message: "operation \(i): \"from\" names nothing") }
                doc = try edit(doc, pointer[...], .add(v), i)
            case "test":
                guard get(doc, pointer[...]) == (try value()) else {
                    throw Failure(message: "operation \(i): test failed at \(path)")
                }
            default:
                throw Failure(message: "operation \(i): unknown op \"\(name)\"")
            }
        }
        return doc
    }

    enum Edit {
        case add(JSONValue), remove, replace(JSONValue)
    }

    static func parse(_ pointer: String, _ i: Int) throws(Failure) -> [String] {
        if pointer.isEmpty { return [] }
        guard pointer.hasPrefix("/") else { throw Failure(message: "operation \(i): path \"\(pointer)\" must start with /") }
        return pointer.dropFirst().split(separator: "/", omittingEmptySubsequences: false).map {
            $0.replacingOccurrences(of: "~1", with: "/").replacingOccurrences(of: "~0", with: "~")
        }
    }

    static func get(_ doc: JSONValue, _ path: ArraySlice<String>) -> JSONValue? {
        guard let head = path.first else { return doc }
        switch doc {
        case .object(let o): return o[head].flatMap { get($0, path.dropFirst()) }
        case .array(let a):
            guard let i = Int(head), a.indices.contains(i) else { return nil }
            return get(a[i], path.dropFirst())
        default: return nil
        }
    }

    static func edit(_ doc: JSONValue, _ path: ArraySlice<String>, _ e: Edit, _ i: Int) throws(Failure) -> JSONValue {
        guard let head = path.first else {
            switch e {
            case .add(let v), .replace(let v): return v
            case .remove: throw Failure(message: "operation \(i): cannot remove the whole document")
            }
        }
        let last = path.count == 1
        switch doc {
        case .object(var o):
            if last {
                switch e {
                case .add(let v): o[head] = v
                case .replace(let v):
                    guard o[head] != nil else { throw Failure(message: "operation \(i): nothing to replace at /\(head)") }
                    o[head] = v
                case .remove:
                    guard o[head] != nil else { throw Failure(message: "operation \(i): nothing to remove at /\(head)") }
                    o[head] = nil
                }
            } else {
                guard let child = o[head] else { throw Failure(message: "operation \(i): no member \"\(head)\"") }
                o[head] = try edit(child, path.dropFirst(), e, i)
            }
            return .object(o)
        case .array(var a):
            let index: Int
            if head == "-" {
                guard last, case .add = e else { throw Failure(message: "operation \(i): \"-\" only appends") }
                index = a.count
            } else {
                guard let n = Int(head), n >= 0, String(n) == head else {
                    throw Failure(message: "operation \(i): \"\(head)\" is not an array index")
                }
                index = n
            }
            if last {
                switch e {
                case .add(let v):
                    guard index <= a.count else { throw Failure(message: "operation \(i): index \(index) is out of range") }
                    a.insert(v, at: index)
                case .replace(let v):
                    guard index < a.count else { throw Failure(message: "operation \(i): index \(index) is out of range") }
                    a[index] = v
                case .remove:
                    guard index < a.count else { throw Failure(message: "operation \(i): index \(index) is out of range") }
                    a.remove(at: index)
                }
            } else {
                guard index < a.count else { throw Failure(message: "operation \(i): index \(index) is out of range") }
                a[index] = try edit(a[index], path.dropFirst(), e, i)
            }
            return .array(a)
        default:
            throw Failure(message: "operation \(i): \"\(head)\" is inside a value that is neither an object nor a list")
        }
    }
}
