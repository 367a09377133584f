"""Process exit statuses, from sysexits.h where one fits.

systemd units use these to tell "restart me" from "fix me first"
(RestartPreventExitStatus=77 78).
"""

OK = 0
SOFTWARE = 70  # EX_SOFTWARE: the consumer failed unrecoverably
NOPERM = 77  # EX_NOPERM: the broker refused our credentials or virtual host at login
CONFIG = 78  # EX_CONFIG: the configuration (or the callback it names) is unusable
