// Runs user code inside the Node.js image. Reads from stdin one header line
// "CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>\n" (the last two,
// for Python's figures, may be missing and are ignored here), then the code, with exact-size
// reads so that the rest of stdin is left to the program. The code runs as the main CommonJS
// module /sandbox/main.js, compiled from memory: no file is written, since /sandbox is the
// user's (an uploaded main.js stays theirs, and every new file there is reported as created).
//
// A first line "CODOMYRMEX-SESSION1 <nonce> <max figures> <max figure bytes>\n" starts a session
// instead: this one process serves many calls, each "CODOMYRMEX-CALL1 <nonce> <code length>
// <stdin length>\n<code><stdin>", in one global scope, and ends each with "done=<status>"
// trailers on fd 1 and fd 2, then signal 40 to PID 1 (the sandbox's init then reports the files
// the call changed). See session() below; codomyrmex_sandbox/protocol.py decides.
'use strict';
const fs = require('fs');
const Module = require('module');
const net = require('net');
const path = require('path');
const vm = require('vm');

// Node leaves stdout and stderr non-blocking when they are pipes: a write the pipe cannot take at
// once is queued in the process's memory. A program that writes in a loop without yielding then
// grows to its memory limit (an output flood ends as memory_limit, not output_limit), and
// process.exit() drops what is still queued. Blocking writes keep the program's output in order,
// bounded by the pipe, and on its way before any trailer of the runner's.
for (const stream of [process.stdout, process.stderr]) {
  if (stream._handle && typeof stream._handle.setBlocking === 'function') stream._handle.setBlocking(true);
}

const SESSION_MAGIC = 'CODOMYRMEX-SESSION1';
const CALL_MAGIC = 'CODOMYRMEX-CALL1';
const CALL_DONE_SIGNAL = 40; // the raw number (glibc's SIGRTMIN+6): what the init waits for after a call
const FILE = path.join('/sandbox', 'main.js');

function readExact(n) {
  const buf = Buffer.alloc(n);
  let got = 0;
  while (got < n) {
    let r;
    try {
      r = fs.readSync(0, buf, got, n - got, null);
    } catch (e) {
      if (e.code === 'EAGAIN') continue;
      throw e;
    }
    if (r === 0) break;
    got += r;
  }
  return buf.subarray(0, got);
}

function readHeader() {
  const one = Buffer.alloc(1);
  let line = '';
  while (line.length < 256) {
    const r = fs.readSync(0, one, 0, 1, null);
    if (r === 0 || one[0] === 10) break;
    line += String.fromCharCode(one[0]);
  }
  return line.split(' ');
}

// What Node's loader does for `node /sandbox/main.js`, minus reading the file: the module is the
// main one (`require.main === module`), resolves `require('./x')` and node_modules from
// /sandbox, and is cached under its name.
function mainModule() {
  process.argv = [process.argv[0], FILE];
  const main = new Module(FILE, null);
  main.id = '.';
  main.filename = FILE;
  main.paths = Module._nodeModulePaths(path.dirname(FILE));
  process.mainModule = main;
  Module._cache[FILE] = main;
  return main;
}

function sourceText(source) {
  let text = source.toString('utf8');
  // The loader drops a byte order mark; so does this.
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  return text;
}

function runOnce(nonce, length) {
  const source = readExact(length);
  // Report a deliberate exit status out of band, on stdout and stderr, so that process.exit(137) is
  // not taken for a SIGKILL and the host knows both streams are complete. The streams block (see
  // the top), so everything the program wrote before is already on its way.
  process.on('exit', (code) => {
    for (const fd of [1, 2]) {
      // The kernel keeps the low 8 bits of an exit status: report what the process really returns.
      try { fs.writeSync(fd, `\0${nonce}:exit=${code & 0xff}\0`); } catch (e) { /* stream closed */ }
    }
  });
  // Node prints an uncaught error through buffered C stdio, after the 'exit' handlers: print it
  // here instead, synchronously, as Node would, so it lands before the exit trailers. Unhandled
  // promise rejections arrive here too (Node's default 'throw' mode).
  process.on('uncaughtException', (err) => {
    const text = err instanceof Error && err.stack ? err.stack : `Uncaught ${require('util').inspect(err)}`;
    try { fs.writeSync(2, `${text}\n\nNode.js ${process.version}\n`); } catch (e) { /* stream closed */ }
    process.exit(1);
  });
  const main = mainModule();
  main._compile(sourceText(source), FILE);
  main.loaded = true;
}

// -- sessions ------------------------------------------------------------------------------------
//
// Every call's code runs with vm.runInThisContext as a script named /sandbox/main.js, in the one
// global scope: its top-level let, const, class and function declarations stay for the next call
// (declaring the same let or const again is then a SyntaxError, as in a browser's console), and
// its `var`s become globals. `require` (resolving from /sandbox), `module`, `exports`,
// `__filename` and `__dirname` are globals. A script has no top-level `return` or `await`, and
// Node 18 gives it no import(): a call that ends with a promise (its completion value, e.g. an
// async function called last) is awaited, a rejection being the call's error. A thrown error is
// printed as Node prints an uncaught one (status 1); the session goes on.
//
// Between calls the runner waits for the next one on the event loop (the control channel is read
// as a pipe socket, asynchronously), so the timers, servers and promises a call left keep running
// between calls. What they print is written when they print it, after the previous call's done
// trailers: the host sees it as the next call's output. Their uncaught errors (and unhandled
// rejections) are printed on stderr, at any time, and the session lives on.

// A write that the program's non-blocking stdout (Node makes fd 1 and fd 2 non-blocking once it
// has made process.stdout and process.stderr on pipes) cannot take now is tried again shortly.
const pause = new Int32Array(new SharedArrayBuffer(4));

function writeAll(fd, text) {
  const data = Buffer.from(text);
  let written = 0;
  while (written < data.length) {
    try {
      written += fs.writeSync(fd, data, written);
    } catch (e) {
      if (e.code !== 'EAGAIN') return; // the stream is gone: nobody reads it
      Atomics.wait(pause, 0, 0, 1);
    }
  }
}

// An error as Node prints an uncaught one (and the one-shot runner does), without the frames of
// the runner below the program's own: vm's and this file's.
function described(err) {
  let text;
  try {
    text = err instanceof Error && err.stack ? String(err.stack) : `Uncaught ${require('util').inspect(err)}`;
  } catch (e) {
    text = 'Uncaught exception (it cannot be printed)';
  }
  const lines = text.split('\n');
  let end = lines.findIndex((line) => /^\s+at /.test(line) && line.includes(__filename));
  if (end !== -1) {
    while (end > 0 && /^\s+at .*\(node:vm:\d+:\d+\)$/.test(lines[end - 1])) end -= 1;
    text = lines.slice(0, end).join('\n');
  }
  return `${text}\n\nNode.js ${process.version}\n`;
}

function isThenable(value) {
  try {
    return value !== null && (typeof value === 'object' || typeof value === 'function') && typeof value.then === 'function';
  } catch (e) {
    return false; // a proxy whose `then` throws is no promise
  }
}

function session(openNonce) {
  // The control channel: a description of its own of the stdin pipe (opening /proc/self/fd/0
  // makes one; close-on-exec, as Node opens every file), so that no child process holds it. Node
  // has no dup2: fd 0 is closed, and the lowest free descriptor, 0, opened again for each call.
  const control = fs.openSync('/proc/self/fd/0', 'r');
  let current = openNonce; // the call under way, under whose nonce an exit is reported
  let stdin = null; // the call's process.stdin, made when the program first asks for it

  // Each call gets its own fd 0 and its own process.stdin: Node's would have read the first
  // call's input to its end and stay ended. fs.readFileSync(0) and process.stdin both read the
  // current call's input in every call; a process.stdin kept from an earlier call is destroyed.
  function giveStdin(file) {
    const check = fs.openSync(file, 'r'); // fails, if it must, before fd 0 is closed
    if (stdin !== null) stdin.destroy(); // autoClose is off: this closes no descriptor
    stdin = null;
    fs.closeSync(0);
    let fd;
    try {
      fd = fs.openSync(file, 'r');
    } finally {
      fs.closeSync(check);
    }
    Object.defineProperty(process, 'stdin', {
      configurable: true,
      enumerable: true,
      get() {
        if (stdin === null) { // as Node makes process.stdin for a file
          stdin = new fs.ReadStream(null, { fd: 0, autoClose: false });
          stdin.fd = 0;
        }
        return stdin;
      },
    });
    if (fd !== 0) { // a thread of Node's took fd 0 between the close and the open
      fs.closeSync(fd);
      throw new Error("fd 0 could not be given the call's stdin");
    }
  }
  giveStdin('/dev/null');

  // The streams the program has made of process.stdout and process.stderr (Node makes them on
  // first use): what the pipe could not take yet waits in them, and goes out before the trailers.
  const streams = [];
  for (const name of ['stdout', 'stderr']) {
    const made = Object.getOwnPropertyDescriptor(process, name);
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: made.enumerable,
      get() {
        const stream = made.get.call(process);
        if (!streams.includes(stream)) streams.push(stream);
        return stream;
      },
    });
  }

  const main = mainModule();
  main.loaded = true;
  Object.assign(globalThis, {
    require: Module.createRequire(FILE),
    module: main,
    exports: main.exports,
    __filename: FILE,
    __dirname: path.dirname(FILE),
  });

  // process.exit() in a call: exit trailers under that call's nonce, after the program's own
  // 'exit' handlers (process.exit() emits 'exit', then calls process.reallyExit()).
  const reallyExit = process.reallyExit;
  process.reallyExit = (code) => {
    if (current !== null) {
      for (const fd of [1, 2]) writeAll(fd, `\0${current}:exit=${code & 0xff}\0`);
    }
    reallyExit.call(process, code);
  };
  // An uncaught error (or unhandled rejection) is printed whenever it comes; one that comes while
  // a call is under way (its own callbacks, or a timer of an earlier call's that fires then) makes
  // that call's status 1, as it would make one run's exit status 1.
  let uncaught = false;
  process.on('uncaughtException', (err) => {
    writeAll(2, described(err));
    if (current !== null) uncaught = true;
  });

  async function run(code) {
    let value;
    try {
      value = vm.runInThisContext(code, { filename: FILE });
    } catch (err) {
      writeAll(2, described(err));
      return 1;
    }
    let status = 0;
    if (isThenable(value)) {
      try {
        await value;
      } catch (err) {
        writeAll(2, described(err));
        status = 1;
      }
    }
    // What the code has queued runs before the call ends (one turn of setImmediate).
    await new Promise((resolve) => setImmediate(resolve));
    return status;
  }

  async function done(nonce, status) {
    if (uncaught) status = status || 1;
    for (const stream of streams) {
      while (stream.writableLength > 0 && !stream.destroyed) {
        await new Promise((resolve) => {
          const settle = () => {
            stream.off('drain', settle);
            stream.off('close', settle);
            resolve();
          };
          stream.on('drain', settle);
          stream.on('close', settle);
        });
      }
    }
    for (const fd of [1, 2]) writeAll(fd, `\0${nonce}:done=${status}\0`);
    current = null;
    uncaught = false;
    try { process.kill(1, CALL_DONE_SIGNAL); } catch (e) { /* no init to tell (the runner is PID 1 itself) */ }
  }

  // The channel, read as it comes: a header line, the code, then the stdin bytes, which go
  // straight into a file under /tmp (not /sandbox: the user's), opened as the call's fd 0.
  let header = '';
  let call = null; // the call being read: { nonce, code, codeLeft, stdinLeft, path, out, failure }
  let busy = false;
  const waiting = []; // bytes that came while a call ran (a host sends none; kept in order if it does)

  function malformed() {
    current = null;
    writeAll(2, 'codomyrmex runner: a malformed call header\n');
    process.exit(125);
  }

  function startCall(line) {
    const fields = line.split(' ');
    if (fields.length !== 4 || fields[0] !== CALL_MAGIC || !/^[0-9]+$/.test(fields[2] + fields[3])) malformed();
    call = { nonce: fields[1], code: [], codeLeft: Number(fields[2]), stdinLeft: Number(fields[3]) };
    current = call.nonce;
    if (call.stdinLeft > 0) {
      // The nonce in the name: not a name the program could have made ready ('wx': O_EXCL).
      call.path = `/tmp/.codomyrmex-stdin-${call.nonce}`;
      try {
        call.out = fs.openSync(call.path, 'wx', 0o600);
      } catch (e) {
        call.failure = e;
      }
    }
  }

  function store(bytes) {
    if (call.failure) return; // read anyway, so that the next call's header is where it should be
    try {
      let written = 0;
      while (written < bytes.length) written += fs.writeSync(call.out, bytes, written);
    } catch (e) {
      call.failure = e;
    }
  }

  function feed(chunk) {
    let at = 0;
    while (at < chunk.length || (call !== null && call.codeLeft === 0 && call.stdinLeft === 0)) {
      if (busy) {
        waiting.push(chunk.subarray(at));
        channel.pause();
        return;
      }
      if (call === null) {
        const newline = chunk.indexOf(10, at);
        header += chunk.toString('latin1', at, newline === -1 ? chunk.length : newline);
        if (header.length > 256) malformed();
        if (newline === -1) return;
        at = newline + 1;
        startCall(header);
        header = '';
        continue;
      }
      if (call.codeLeft > 0) {
        const take = Math.min(call.codeLeft, chunk.length - at);
        call.code.push(chunk.subarray(at, at + take));
        call.codeLeft -= take;
        at += take;
      } else if (call.stdinLeft > 0) {
        const take = Math.min(call.stdinLeft, chunk.length - at);
        store(chunk.subarray(at, at + take));
        call.stdinLeft -= take;
        at += take;
      }
      if (call.codeLeft === 0 && call.stdinLeft === 0) {
        const ready = call;
        call = null;
        busy = true;
        runCall(ready).then(resume, (err) => { // the runner's own failure: the call cannot end well
          writeAll(2, described(err));
          process.exit(125);
        });
      }
    }
  }

  async function runCall(ready) {
    let status;
    try {
      if (ready.out !== undefined) fs.closeSync(ready.out);
      if (ready.failure) throw ready.failure;
      giveStdin(ready.path === undefined ? '/dev/null' : ready.path);
    } catch (err) { // not stored (/tmp full, say): the code does not run without its input
      writeAll(2, `codomyrmex runner: the call's stdin could not be given: ${err.message}\n`);
      status = 1;
    } finally {
      if (ready.path !== undefined) {
        try { fs.unlinkSync(ready.path); } catch (e) { /* never made */ }
      }
    }
    if (status === undefined) status = await run(sourceText(Buffer.concat(ready.code)));
    await done(ready.nonce, status);
  }

  function resume() {
    busy = false;
    while (waiting.length > 0 && !busy) feed(waiting.shift());
    if (!busy) channel.resume();
  }

  const channel = new net.Socket({ fd: control, readable: true, writable: false });
  channel.on('data', feed);
  // The host hung up (or the channel broke): nobody reads any more, and the init ends the sandbox.
  channel.on('end', () => { current = null; process.exit(0); });
  channel.on('error', () => { current = null; process.exit(0); });
  done(openNonce, 0); // the session is open: acknowledged like a call that ran no code
}

const [magic, nonce, length] = readHeader(); // the figures' limits do not apply here
if (magic === SESSION_MAGIC) {
  session(nonce);
} else {
  if (magic !== 'CODOMYRMEX1') process.exit(125);
  runOnce(nonce, parseInt(length, 10));
}
