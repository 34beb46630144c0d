'use strict';
// The one error type the scripts print as a single line on stderr; anything else is a bug and may trace back.

class ClientError extends Error {}

/** Message of any error on one line: onnxruntime's span several. */
function oneLine(error) {
  return String(error && error.message !== undefined ? error.message : error).split(/\s+/).join(' ').trim();
}

/** Run `main(argv)` (async, returns an exit code); a ClientError or an option error becomes one stderr line. */
function runMain(main) {
  main(process.argv.slice(2)).then(
    (code) => { process.exitCode = code; },
    (error) => {
      // util.parseArgs throws TypeErrors with ERR_PARSE_ARGS_* codes for unknown or malformed options.
      const optionError = typeof error?.code === 'string' && error.code.startsWith('ERR_PARSE_ARGS');
      if (!(error instanceof ClientError) && !optionError) throw error;
      // Node's option errors go on to explain `--` for positionals: their first sentence is the news.
      const line = optionError ? oneLine(error).split(/(?<=\.) /)[0] : oneLine(error);
      process.stderr.write(`error: ${line}\n`);
      process.exitCode = 2;
    },
  );
}

module.exports = { ClientError, oneLine, runMain };
