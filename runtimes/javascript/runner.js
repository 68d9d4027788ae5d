// Runs user code inside the Node.js image. Reads from stdin one header line
// "CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>\n" (the last two,
// for Python's figures, may be missing and are ignored here), then the code, with exact-size
// reads so that the rest of stdin is left to the program. The code runs as the main CommonJS
// module /sandbox/main.js, compiled from memory: no file is written, since /sandbox is the
// user's (an uploaded main.js stays theirs, and every new file there is reported as created).
'use strict';
const fs = require('fs');
const Module = require('module');
const path = require('path');

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
  const [magic, nonce, length] = line.split(' ');  // the figures' limits do not apply here
  if (magic !== 'CODOMYRMEX1') process.exit(125);
  return [nonce, parseInt(length, 10)];
}

const [nonce, length] = readHeader();
const source = readExact(length);
const file = path.join('/sandbox', 'main.js');
// Report a deliberate exit status out of band, on stdout and stderr, so that process.exit(137) is
// not taken for a SIGKILL and the host knows both streams are complete. Pipes are synchronous on
// Linux, so everything the program wrote before is already on its way.
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
process.argv = [process.argv[0], file];
// What Node's loader does for `node /sandbox/main.js`, minus reading the file: the module is the
// main one (`require.main === module`), resolves `require('./x')` and node_modules from
// /sandbox, and is cached under its name.
const main = new Module(file, null);
main.id = '.';
main.filename = file;
main.paths = Module._nodeModulePaths(path.dirname(file));
process.mainModule = main;
Module._cache[file] = main;
let text = source.toString('utf8');
// The loader drops a byte order mark; so does this.
if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
main._compile(text, file);
main.loaded = true;
