# gpufleet-conf-edit.awk: rewrite a Proxmox guest's .conf: drop the lines of `del` and append the lines of
# `add` at the end of the main section (above any [snapshot] section); blank lines before a section kept.
# Run as awk -v add=LINES -v del=LINES -f (inline) CONF by operations/proxmox/passthrough.py (conf_edit_command).
BEGIN { n = split(add, A, "\n"); m = split(del, D, "\n"); for (i = 1; i <= m; i++) R[D[i]] = 1; main = 1 }
main && /^\[/ { for (i = 1; i <= n; i++) print A[i]; main = 0; for (; b > 0; b--) print ""; print; next }
main && ($0 in R) { next }
main && /^$/ { b++; next }
main { for (; b > 0; b--) print "" }
{ print }
END { if (main) for (i = 1; i <= n; i++) print A[i] }
