"""Sites with no internet: the verified bundle (``bundle``: build, verify, sign), the resumable,
verified transfer of files to hosts and between them (``staging``), and what a host takes from a
staged bundle: its apt repository and image archives (``from_bundle``)."""
