"""The inner-points probe (--inner): implementations that can also capture the points inside each layer
(layer.{i}.attn.q, .k after RoPE, .scores, .probs, .out, layer.{i}.mlp.hidden), so a finding names the innermost point
that departs first. It only changes the trace job; the runners with `captures_inner` do the capturing."""

from __future__ import annotations


from bughunt.probes import FlagProbe, ProbeOptions


class Options(ProbeOptions):
    inner: bool = False


class Inner(FlagProbe):
    name = "inner"
    Options = Options
    flag = "--inner"
    help = ("also capture the points inside each layer where an implementation can (hf, reference): "
            "layer.{i}.attn.q, .k (after RoPE), .scores (after scale and soft-cap), .probs, .out (before the output "
            "projection), layer.{i}.mlp.hidden; scores and probs take tokens^2 per head and layer")

    def trace_job(self, options: Options) -> dict:
        return {"inner": True}


PROBE = Inner()
