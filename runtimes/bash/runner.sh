# Runs user code inside the bash image. Reads from stdin one header line
# "CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>" (the last two, for
# Python's figures, may be missing and are ignored here), then the code, and leaves the rest of
# stdin to the program. `read` takes a pipe one byte at a time and `head -c` never reads past its
# count, so the program's stdin starts exactly after the code.
IFS=' ' read -r magic nonce length max_figures max_figure_bytes || exit 125
if [ "$magic" = CODOMYRMEX-SESSION1 ]; then
  # A session ("CODOMYRMEX-SESSION1 <nonce> <max figures> <max figure bytes>"): this one shell
  # runs many calls, each "CODOMYRMEX-CALL1 <nonce> <code length> <stdin length>\n<code><stdin>"
  # on the stdin pipe, which the runner keeps on a descriptor of its own above 9 (bash cannot make
  # it close-on-exec: the program's commands inherit it, and would only harm their own session by
  # reading it). Each call's code is written to /tmp/main.sh and sourced by this shell, not a
  # subshell, at its top level (not in a function, so that `declare` makes globals): variables,
  # functions, aliases, the working directory, options and exports stay for the next call, and
  # background jobs keep running (what they print comes when they print it, after the previous
  # call's trailers). Its fd 0 is a file holding the call's stdin, unlinked once open.
  #
  # A call ends with "done=<$? of the source>" on fd 1 and fd 2 under its nonce, then the builtin
  # `kill -40 1` (the sandbox's init then reports the files the call changed). `exit` ends the
  # shell with "exit=<status>" under the call's nonce, from the EXIT trap, as one run does; so does
  # whatever ends a non-interactive shell: with `set -e` (which stays set for the next calls, as
  # every option does) a failing command ends the session, as it ends a script, and so do an
  # unbound variable under `set -u` and ${x:?}. A `break` or `continue` at the top level of the
  # code ends the call there (done=0). The program's own `trap ... EXIT` replaces the runner's, as
  # in one run: its exit then reports nothing, and the init reports the end. Ctrl-C and the other
  # fatal signals end the shell as in one run.
  #
  # The runner's own part between two calls is parsed before any code runs (aliases the code
  # defines do not touch it) and calls only `builtin`s, `command`s by absolute path and its own
  # functions, under its own options (`local -`: no errexit, nounset, pipefail, xtrace, errtrace
  # or functrace there, and the code gets its own back) with IFS set where it splits, so functions
  # or aliases named read, printf, kill, exec, source or head, a changed IFS or PATH, and set -euxET
  # or pipefail do not break it (redefining `builtin` or `command` themselves does). Its trace
  # under `set -x` and its errors go to /dev/null, its stderr trailers to the real fd 2 (as fd 3).
  # The code's traps stay set. `source` runs the code without the DEBUG trap unless `set -T` is on
  # (and puts back, when it returns, a DEBUG trap the code removed), so a DEBUG trap runs around
  # the runner's two top-level commands, the `source` and the step after it; so does RETURN.
  exec {__codomyrmex_ctl}<&0 0</dev/null
  __codomyrmex_nonce=$nonce # the call under way: the opening's, acknowledged by the first step
  unset magic nonce length max_figures max_figure_bytes

  # Copies the next $1 bytes of the channel to stdout, exactly, and no byte more. A short one is
  # read by `read` (no process to start), a piece at a time: up to the count, or to a NUL, which
  # a variable cannot hold and which is written apart; a long one by `head -c`.
  __codomyrmex_copy() {
    builtin local LC_ALL=C __codomyrmex_left=$1 __codomyrmex_asked __codomyrmex_part # bytes, not characters
    if ((__codomyrmex_left > 4096)); then
      command /usr/bin/head -c "$__codomyrmex_left" <&"$__codomyrmex_ctl"
      return
    fi
    while ((__codomyrmex_left > 0)); do
      __codomyrmex_asked=$__codomyrmex_left
      IFS= builtin read -r -d '' -n "$__codomyrmex_asked" -u "$__codomyrmex_ctl" __codomyrmex_part || return 1
      builtin printf %s "$__codomyrmex_part"
      ((__codomyrmex_left -= ${#__codomyrmex_part}))
      if ((${#__codomyrmex_part} < __codomyrmex_asked)); then # stopped at a NUL
        builtin printf '\0'
        ((__codomyrmex_left -= 1))
      fi
    done
    return 0
  }

  # Ends the call under way with the code's status $1, then reads the next call and gives it fd 0.
  __codomyrmex_step() {
    builtin local - __codomyrmex_magic __codomyrmex_call __codomyrmex_code __codomyrmex_input __codomyrmex_more
    builtin set +euxET +o pipefail
    if [[ -n $__codomyrmex_nonce ]]; then
      builtin printf '\0%s:done=%d\0' "$__codomyrmex_nonce" "$1"
      builtin printf '\0%s:done=%d\0' "$__codomyrmex_nonce" "$1" >&3
      __codomyrmex_nonce=
      builtin kill -40 1 # the runner is this shell: the init knows the sender
    fi
    # The end of the channel: the host hung up, nobody reads any more (and no call is under way).
    IFS=' ' builtin read -r -u "$__codomyrmex_ctl" __codomyrmex_magic __codomyrmex_call __codomyrmex_code \
      __codomyrmex_input __codomyrmex_more || builtin exit 0
    if [[ $__codomyrmex_magic != CODOMYRMEX-CALL1 || -n $__codomyrmex_more ||
      ! $__codomyrmex_code =~ ^[0-9]+$ || ! $__codomyrmex_input =~ ^[0-9]+$ ]]; then
      __codomyrmex_abort 'a malformed call header'
    fi
    __codomyrmex_nonce=$__codomyrmex_call
    # In /tmp, as in one run (error messages name /tmp/main.sh): /sandbox is the user's.
    __codomyrmex_copy "$__codomyrmex_code" 2>&3 >| /tmp/main.sh || __codomyrmex_abort 'the code could not be stored'
    if ((__codomyrmex_input > 0)); then
      # The nonce in the name: not a name the program could have made ready for it.
      builtin local __codomyrmex_file=/tmp/.codomyrmex-stdin-$__codomyrmex_call
      if ! __codomyrmex_copy "$__codomyrmex_input" 2>&3 >| "$__codomyrmex_file" ||
        ! command exec 0< "$__codomyrmex_file"; then
        # What is left of it in the channel would be read as the next call: the session ends.
        __codomyrmex_abort "the call's stdin could not be stored"
      fi
      command /usr/bin/rm -f -- "$__codomyrmex_file"
    else
      command exec 0< /dev/null
    fi
  }

  # Ends the session from the runner's own part, where fd 3 is the real stderr: the reason, and
  # the exit trailers if a call is under way (what is left of it cannot be read as it should be).
  __codomyrmex_abort() {
    builtin printf 'codomyrmex runner: %s\n' "$1" >&3
    __codomyrmex_exited 125
    __codomyrmex_nonce=
    builtin exit 125
  }

  # The EXIT trap: the exit status $1 under the nonce of the call under way, if one is.
  __codomyrmex_exited() {
    [[ -n $__codomyrmex_nonce ]] || return 0
    builtin printf '\0%s:exit=%d\0' "$__codomyrmex_nonce" "$1"
    builtin printf '\0%s:exit=%d\0' "$__codomyrmex_nonce" "$1" >&3
  }
  trap '{ \__codomyrmex_exited "$?"; } 3>&2 2>/dev/null' EXIT
  for __sig in HUP INT QUIT ABRT USR1 USR2 ALRM TERM PIPE; do
    trap "\\builtin trap - EXIT $__sig; \\builtin kill -$__sig \$\$" "$__sig"
  done
  unset __sig

  # The loop. A `break` at the top level of the code leaves it: then the same loop runs again in
  # an eval (each such break nests one more: a few hundred bytes), whose first step ends the call.
  # The loop also ends if its step cannot even be started because the code closed fd 2: that one
  # then becomes /dev/null (where the stderr trailers go), rather than the eval nesting forever.
  __codomyrmex_loop='\builtin : >&2 || \command exec 2>/dev/null
while { \__codomyrmex_step "$?"; } 3>&2 2>/dev/null; do \builtin source /tmp/main.sh; done
\builtin eval "$__codomyrmex_loop"'
  builtin readonly __codomyrmex_loop __codomyrmex_ctl
  BASH_ARGV0=main.sh
  while { __codomyrmex_step "$?"; } 3>&2 2>/dev/null; do builtin source /tmp/main.sh; done
  builtin eval "$__codomyrmex_loop"
fi
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
