import SluiceTelemetry
import XCTest

final class MetricsRegistryTests: XCTestCase {
    func testCountersMergeAcrossShards() {
        let r = MetricsRegistry(capacity: 64)
        let a = r.makeShard(), b = r.makeShard()
        let slot = r.counter("istio_tcp_connections_opened_total", help: "opened", labels: [("destination_service", "x")])
        a.add(slot, 3)
        b.add(slot, 4)
        XCTAssertEqual(r.value(slot), 7)
        let text = r.render()
        XCTAssertTrue(text.contains("# TYPE istio_tcp_connections_opened_total counter\n"))
        XCTAssertTrue(text.contains("istio_tcp_connections_opened_total{destination_service=\"x\"} 7\n"), text)
    }

    func testSameLabelsShareASlot() {
        let r = MetricsRegistry(capacity: 64)
        XCTAssertEqual(r.counter("c", help: "", labels: [("a", "1")]), r.counter("c", help: "", labels: [("a", "1")]))
        XCTAssertNotEqual(r.counter("c", help: "", labels: [("a", "1")]), r.counter("c", help: "", labels: [("a", "2")]))
    }

    func testGaugesGoUpAndDownAcrossShards() {
        let r = MetricsRegistry(capacity: 64)
        let a = r.makeShard(), b = r.makeShard()
        let g = r.gauge("g", help: "", labels: [])
        a.addSigned(g, 5)
        b.addSigned(g, -2)
        XCTAssertTrue(r.render().contains("g{} 3\n"))
    }

    func testHistogramBucketsAreCumulative() {
        let r = MetricsRegistry(capacity: 64)
        let s = r.makeShard()
        let h = r.histogram("lat", help: "", buckets: [1, 10], labels: [("c", "x")])
        for v in [0.5, 5, 5, 50] { s.observe(h, v) }
        let text = r.render()
        XCTAssertTrue(text.contains("lat_bucket{c=\"x\",le=\"1\"} 1\n"), text)
        XCTAssertTrue(text.contains("lat_bucket{c=\"x\",le=\"10\"} 3\n"))
        XCTAssertTrue(text.contains("lat_bucket{c=\"x\",le=\"+Inf\"} 4\n"))
        XCTAssertTrue(text.contains("lat_count{c=\"x\"} 4\n"))
        XCTAssertTrue(text.contains("lat_sum{c=\"x\"} 60.5\n"), text)
    }

    func testLabelValuesAreEscaped() {
        let r = MetricsRegistry(capacity: 8)
        _ = r.counter("c", help: "", labels: [("v", "a\"b\\c\nd")])
        XCTAssertTrue(r.render().contains(#"c{v="a\"b\\c\nd"} 0"#))
    }
}
