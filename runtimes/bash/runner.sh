# Runs user code inside the bash image. Reads from stdin one header line
# "CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>" (the last two, for
# Python's figures, may be missing and are ignored here), then the code, and leaves the rest of
# stdin to the program. `read` takes a pipe one byte at a time and `head -c` never reads past its
# count, so the program's stdin starts exactly after the code.
IFS=' ' read -r magic nonce length max_figures max_figure_bytes || exit 125
[ "$magic" = CODOMYRMEX1 ] || exit 125
# The script lives in /tmp: /sandbox is the user's, where a main.sh of theirs may be uploaded and
# where every file that appears is reported as created.
head -c "$length" > /tmp/main.sh || exit 125
# Report a deliberate exit status out of band, on stdout and stderr, so that `exit 137` is not
# taken for a SIGKILL and the host knows both streams are complete. The nonce is an argument,
# never part of printf's format: a leading digit would read as octal.
trap "__rc=\$?; printf '\\0%s:exit=%d\\0' '${nonce}' \"\$__rc\"; printf '\\0%s:exit=%d\\0' '${nonce}' \"\$__rc\" >&2" EXIT
# A fatal signal makes bash run the EXIT trap too, which would report a deliberate exit: on those
# signals, drop the trap and die by the signal itself, so the engine records how it really ended.
for __sig in HUP INT QUIT ABRT USR1 USR2 ALRM TERM PIPE; do
  trap "trap - EXIT $__sig; kill -$__sig \$\$" "$__sig"
done
unset magic nonce length max_figures max_figure_bytes __sig
BASH_ARGV0=main.sh
source /tmp/main.sh
