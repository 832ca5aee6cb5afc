"""
The site's gateway (hosts of ``gateway_hosts``): HAProxy from the distribution, one TLS endpoint in
front of every host's services. ``pools.py`` reads the inventory into one pool per service name,
``install.py`` is the gateway role, ``drain.py`` the operations a served host runs to leave and
rejoin every gateway's pools around its own restarts.
"""
