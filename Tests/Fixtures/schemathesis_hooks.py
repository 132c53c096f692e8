"""Schemathesis hooks for the config API run (SCHEMATHESIS_HOOKS=schemathesis_hooks).

A watch streams until the client hangs up or `timeoutSeconds` passes (0 or none: no limit, as Kubernetes' watches
last up to its --min-request-timeout), so a generated `watch=true` reads until schemathesis' own timeout and counts
as a network error. The watch path is still exercised: every request that asks for a watch gets
`timeoutSeconds=1`, and the server must end the stream by itself.
"""
import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    query = case.query
    if isinstance(query, dict) and str(query.get("watch", "")).lower() in ("true", "1"):
        query["timeoutSeconds"] = 1
