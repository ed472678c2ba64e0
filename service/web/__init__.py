"""The operators' web page (issue 8): jobs, pictures, numbers, retry, CSV, health, metrics.

``app`` (Flask routes), ``views`` (what the pages show), ``sources`` (calling AE and header
facts per series, ``web.sqlite``), ``actions`` (retry), ``auth`` (users and roles:
``current_user``, ``require``), ``health`` (``/healthz``), ``server`` (waitress inside
``l3spot serve``). See docs/web.md.
"""
