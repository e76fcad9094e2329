"""Operations: ``/healthz`` and ``/metrics``, config as code, tracing spans, log filters and the
owner's e-mail notices.

:mod:`.tracing`, :mod:`.logfilters` and :mod:`.notifications` sit at the bottom (tokens and calls
use tracing); :mod:`.views` and :mod:`.config_io` sit at the top beside the other entry points.
"""
