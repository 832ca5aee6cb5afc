"""
The site's monitoring (hosts of ``monitoring_hosts``): Prometheus from the distribution, scraping
what ``targets.py`` reads from the inventory, with gpufleet's alert rules (``prometheus.py``); on
every host of an inventory that has a monitoring host, the node exporter (``exporters.py``).
``inventory.py`` reads the whole inventory, not only the hosts a --limit names.
"""
