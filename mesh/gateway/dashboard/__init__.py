"""The web dashboard at the gateway's ``/`` (docs/DASHBOARD.md): ``pages.py`` (routes: page shells and
HTML fragments), ``views.py`` (what the pages show), ``dag.py`` (the plan laid out as SVG), ``templates/``
and ``static/`` (one stylesheet, one script; no CDN, no build step)."""
