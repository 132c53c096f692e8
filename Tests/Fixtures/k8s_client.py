#!/usr/bin/env python3
"""The Python `kubernetes` client's CustomObjectsApi against Sluice's config API (kubeconfig as the first argument):
create, get, list (with a label selector), merge patch, watch from a resourceVersion, delete, and a refused write.
Prints one line per step; exits non-zero on the first mismatch."""
import sys
import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
api = client.CustomObjectsApi()
G, V, NS, P = "networking.istio.io", "v1", "py", "serviceentries"


def entry(name, address):
    return {"apiVersion": f"{G}/{V}", "kind": "ServiceEntry", "metadata": {"name": name, "labels": {"team": "py"}},
            "spec": {"hosts": [f"{name}.py.svc.cluster.local"], "addresses": [address],
                     "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}], "resolution": "STATIC",
                     "endpoints": [{"address": "10.9.0.1"}]}}


created = api.create_namespaced_custom_object(G, V, NS, P, entry("alpha", "240.9.0.1"))
assert created["metadata"]["resourceVersion"] and created["metadata"]["uid"], created
print("create", created["metadata"]["name"], created["metadata"]["resourceVersion"])
got = api.get_namespaced_custom_object(G, V, NS, P, "alpha")
assert got["spec"]["addresses"] == ["240.9.0.1"], got
print("get", got["metadata"]["name"])
api.create_namespaced_custom_object(G, V, NS, P, entry("beta", "240.9.0.2"))
listed = api.list_namespaced_custom_object(G, V, NS, P, label_selector="team=py")
assert sorted(i["metadata"]["name"] for i in listed["items"]) == ["alpha", "beta"], listed
print("list", len(listed["items"]), "rv", listed["metadata"]["resourceVersion"])

events = []
def follow(rv):
    w = watch.Watch()
    for e in w.stream(api.list_namespaced_custom_object, G, V, NS, P, resource_version=rv, timeout_seconds=10):
        events.append((e["type"], e["object"]["metadata"]["name"]))
        if len(events) == 2:
            w.stop()
t = threading.Thread(target=follow, args=(listed["metadata"]["resourceVersion"],))
t.start()

patched = api.patch_namespaced_custom_object(G, V, NS, P, "alpha", {"spec": {"addresses": ["240.9.0.9"]}})
assert patched["spec"]["addresses"] == ["240.9.0.9"] and patched["metadata"]["generation"] == 2, patched
print("patch", patched["metadata"]["resourceVersion"])
api.delete_namespaced_custom_object(G, V, NS, P, "beta")
print("delete beta")
t.join(15)
assert events == [("MODIFIED", "alpha"), ("DELETED", "beta")], events
print("watch", events)

try:
    bad = entry("gamma", "240.9.0.3")
    bad["spec"]["resolution"] = "SOMETIMES"
    api.create_namespaced_custom_object(G, V, NS, P, bad)
    sys.exit("an invalid object was accepted")
except ApiException as e:
    assert e.status == 422 and "SOMETIMES" in e.body, (e.status, e.body)
    print("refused", e.status)
try:
    api.get_namespaced_custom_object(G, V, NS, P, "beta")
    sys.exit("a deleted object is still there")
except ApiException as e:
    assert e.status == 404, e.status
print("ok")
