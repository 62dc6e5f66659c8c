// A node:test reporter that counts the tests that really ran, for e2e/ci.sh: a run in
// which no test ran (no test file found, a file that declares no test, every test skipped)
// exits 0 with the built-in reporters, and must not pass for one that did.
//
// When `node --test` is given files or directories, each file runs as a subprocess and is
// reported as a test of its own, named after the file (and passing if the file loaded,
// even with no test in it): those are not counted. Writes one line at the end:
//
//   e2e-tests: ran=8 passed=8 failed=0 skipped=0 todo=0

export default async function* countReporter(source) {
  const counts = { ran: 0, passed: 0, failed: 0, skipped: 0, todo: 0 };
  for await (const event of source) {
    if (event.type !== 'test:pass' && event.type !== 'test:fail') continue;
    const { name, file, skip, todo, details } = event.data;
    // A file's own entry, or a suite (describe) around tests counted on their own.
    if ((file && name === file) || details?.type === 'suite') continue;
    if (skip) {
      counts.skipped += 1;
    } else if (todo) {
      counts.todo += 1;
    } else {
      counts.ran += 1;
      if (event.type === 'test:pass') counts.passed += 1;
      else counts.failed += 1;
    }
  }
  yield `e2e-tests: ${Object.entries(counts).map(([k, v]) => `${k}=${v}`).join(' ')}\n`;
}
