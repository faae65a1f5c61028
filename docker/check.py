"""Build the project's CPU image here and run the quickstart in it, offline (issue 25).

    python docker/check.py            # from anywhere; needs a Docker daemon (root, or the docker group)

1. The base image, debian:bookworm-slim: used if present, else pulled, else (no registry in reach)
   made here from Debian's packages: `debootstrap --variant=minbase bookworm` from this machine's
   Debian mirror, slimmed as the official image is (no docs, man pages, locales, apt lists), and
   `docker import`ed under that name, so the Dockerfile's FROM is the same everywhere.
2. The image, `--build-arg TORCH=cpu`. This machine's pip sources (`pip config list`: index URLs,
   wheel folders, certificate) go in as build secrets, never into a layer: local folders are served
   on 127.0.0.1 for the build's duration (`--network host`), and pip.conf names them by URL. The
   image is then checked to hold no pip configuration and its history no trace of them.
3. In containers without a network (HF_HUB_OFFLINE=1), as the image's non-root user, with host
   folders mounted: the quickstart's teacher; a short distillation on a read-only root filesystem
   (what Apptainer gives); torchrun with 2 processes as an arbitrary --user UID:GID; torch.compile;
   the output in a fill-mask pipeline.
4. On the host: the files of both runs in the mounted folders, owned by the users that wrote them;
   the image's size.

The host folders go when it ends (--keep keeps them); the image stays (rebuilds reuse its layers;
`docker rmi bert-distil:cpu && docker builder prune` frees the space).
"""

import argparse
import glob
import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "debian:bookworm-slim"
PROJECT = "/opt/bert-distil"  # the image's WORKDIR
QUICKSTART_TEACHER = "teachers/minilm-l6-quick"
ARBITRARY_USER = "4321:4321"  # a --user with no account in the image, as `--user $(id -u):$(id -g)` often is

# What debuerreotype's slimify (the official slim images) keeps out of a Debian root filesystem.
SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
# ... and its apt settings: no package files or caches left behind by an install, no translations.
SLIM_APT = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""
# The official image's apt sources (deb822), the same release with its updates and security fixes.
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def say(message):
    print(message, flush=True)


def run(cmd, check=True, capture=False, show=True, **kw):
    """Run `cmd`, echoing it; with capture, return its output (stdout and stderr together), also echoed."""
    if show:
        say("$ " + shlex.join(cmd))
    if not capture:
        result = subprocess.run(cmd, **kw)
        if check and result.returncode:
            sys.exit(f"error: exit status {result.returncode}: {shlex.join(cmd)}")
        return result.returncode
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if show:
            print("    " + line, end="", flush=True)
    if proc.wait() and check:
        sys.exit(f"error: exit status {proc.returncode}: {shlex.join(cmd)}")
    return "".join(lines)


def quiet(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def image_id(name):
    result = quiet(["docker", "image", "inspect", "-f", "{{.Id}}", name])
    return result.stdout.strip() if result.returncode == 0 else None


# -- 1. the base image ---------------------------------------------------------------------------

def debian_mirror():
    """This machine's Debian mirror (apt's sources), else deb.debian.org."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
        try:
            text = open(path).read()
        except OSError:
            continue
        for uris, suites in re.findall(r"^URIs:\s*(\S+)\s*\nSuites:\s*([^\n]*)", text, re.M):  # deb822
            if "bookworm" in suites.split():
                return uris
        for uri in re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):  # one-line style
            return uri
    return "http://deb.debian.org/debian"


def ensure_base():
    if image_id(BASE):
        say(f"base image {BASE}: present")
        return
    if run(["docker", "pull", BASE], check=False) == 0:
        return
    if not shutil.which("debootstrap"):
        sys.exit(f"error: {BASE} can neither be pulled nor made here: apt-get install debootstrap (as root)")
    mirror = debian_mirror()
    say(f"base image {BASE}: no registry in reach; making it with debootstrap from {mirror}")
    rootfs = tempfile.mkdtemp(prefix="bookworm-rootfs-", dir="/var/tmp")
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror], capture=True, show=False)
        with open(os.path.join(rootfs, "etc/dpkg/dpkg.cfg.d/docker-slim"), "w") as f:
            f.write(SLIM_DPKG)
        with open(os.path.join(rootfs, "etc/apt/apt.conf.d/docker-clean"), "w") as f:
            f.write(SLIM_APT)
        os.remove(os.path.join(rootfs, "etc/apt/sources.list"))
        with open(os.path.join(rootfs, "etc/apt/sources.list.d/debian.sources"), "w") as f:
            f.write(DEBIAN_SOURCES)
        for pattern in ["usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                        "var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*"]:
            for path in glob.glob(os.path.join(rootfs, pattern)):
                if path.endswith(("/copyright", "/locale.alias")) or not os.path.lexists(path):
                    continue  # kept, or gone already (some doc folders are links to others)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "--change", 'CMD ["bash"]', "--change",
             f"LABEL org.opencontainers.image.description=\"Debian 12 minbase, debootstrap from {mirror} "
             f"by bert-distil's docker/check.py\"", "-", BASE], stdin=tar.stdout)
        if tar.wait():
            sys.exit("error: tar of the debootstrap root filesystem failed")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


# -- 2. the image --------------------------------------------------------------------------------

def build_command():
    """`docker buildx build --load` where buildx is installed, else `docker build` with the BuildKit
    that clients before 23.0 have built in (Debian 12's docker.io is 20.10): the Dockerfile's
    `RUN --mount=type=secret` needs BuildKit. A newer client without buildx cannot, so the first
    older one on PATH is used (here /usr/local/bin/docker is 28.2 without buildx, /usr/bin/docker 20.10)."""
    if quiet(["docker", "buildx", "version"]).returncode == 0:
        return ["docker", "buildx", "build", "--load"]
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = os.path.join(folder, "docker")
        if os.access(exe, os.X_OK):
            version = quiet([exe, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
            if re.match(r"(1\d|2[0-2])\.", version):
                return [exe, "build"]
    sys.exit("error: building needs BuildKit: docker buildx (Debian: apt-get install docker-buildx), "
             "or a docker client before 23.0 (Debian 12: apt-get install docker.io)")


def pip_settings():
    """{option: value} of this machine's pip configuration (environment variables win over files)."""
    out = quiet([sys.executable, "-m", "pip", "config", "list"]).stdout
    files, env = {}, {}
    for line in out.splitlines():
        m = re.match(r"^(\S*?)\.([\w-]+)='(.*)'$", line)
        if m:
            (env if m.group(1) == ":env:" else files)[m.group(2)] = m.group(3)
    return {**files, **env}


class LocalFolders(http.server.SimpleHTTPRequestHandler):
    """Serves folder k of `roots` at /k/ (read-only, for the build's pip)."""
    roots = {}

    def translate_path(self, path):
        key, _, rest = urllib.parse.urlsplit(path).path.lstrip("/").partition("/")
        rest = posixpath.normpath("/" + urllib.parse.unquote(rest)).lstrip("/")
        return os.path.join(self.roots[key], rest) if key in self.roots else "/nonexistent"

    def log_message(self, *args):
        pass


def pip_secrets(folder):
    """This machine's pip sources as build secrets: (the --secret flags, the local folders to serve).
    A file:// URL or a local path becomes http://127.0.0.1:PORT/k/...: a wheel folder (find-links)
    served as /k/, an index's simple/ folder as /k/simple/ with its parent as /k/ (its pages link
    to ../../files/)."""
    settings, roots, lines = pip_settings(), {}, ["[global]"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalFolders)
    port = server.server_address[1]

    def reachable(value, index):
        path = urllib.parse.urlsplit(value).path if value.startswith("file://") else value
        if not os.path.isabs(path) or not os.path.exists(path):
            return value  # a URL the build reaches itself
        key, path = str(len(roots)), os.path.normpath(path)
        roots[key] = os.path.dirname(path) if index else path
        return f"http://127.0.0.1:{port}/{key}/" + (os.path.basename(path) + "/" if index else "")

    for option in ("index-url", "extra-index-url", "find-links"):
        if settings.get(option):
            lines.append(f"{option} = " + " ".join(reachable(v, option != "find-links") for v in settings[option].split()))
    if any(v.startswith("http://127.0.0.1") for line in lines for v in line.split()):
        lines.append("trusted-host = 127.0.0.1")
    for option in ("timeout", "default-timeout", "retries"):
        if settings.get(option):
            lines.append(f"{option} = {settings[option]}")
    secrets = []
    if settings.get("cert") and os.path.isfile(settings["cert"]):
        lines.append("cert = /run/secrets/pip-cert")  # where the Dockerfile's secret mount puts it
        secrets += ["--secret", f"id=pip-cert,src={settings['cert']}"]
    conf = os.path.join(folder, "pip.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    secrets += ["--secret", f"id=pip.conf,src={conf}"]
    LocalFolders.roots = roots
    say("pip sources for the build (a secret, not kept): " + "; ".join(lines[1:]))
    for key, path in roots.items():
        say(f"  http://127.0.0.1:{port}/{key}/ serves {path}")
    return secrets, server


def build(image, workdir):
    previous = image_id(image)
    secrets, server = pip_secrets(workdir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    try:
        run(build_command() + ["--network", "host", "--progress", "plain", "--build-arg", "TORCH=cpu",
                               "--build-arg", "TORCH_INDEX=none", *secrets, "-t", image, ROOT], env=env)
    finally:
        server.shutdown()
    new = image_id(image)
    if previous and previous != new and not quiet(["docker", "image", "inspect", "-f", "{{.RepoTags}}",
                                                    previous]).stdout.strip("[]\n"):
        quiet(["docker", "rmi", previous])  # this check's own previous build, left without a tag


def check_clean(image):
    """No pip configuration of the build machine in the image, nor in its history."""
    history = quiet(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image]).stdout
    leaks = [word for word in ("127.0.0.1", "/opt/wheels", "/opt/pypi", "pip-cert,src", "file://") if word in history]
    assert not leaks, f"the image's history shows the build machine's pip sources: {leaks}"
    inside = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                  "id -u; pip config list; env | grep -i '^pip_'; "
                  "find /run/secrets /etc/pip.conf /etc/xdg/pip /opt/venv/pip.conf ! -type d 2>/dev/null; true"],
                 capture=True)
    user = image_user(image).split(":")[0]
    assert inside.split() == [user], f"the image holds pip configuration or runs as another user: {inside!r}"
    say(f"image clean: runs as uid {user}, no pip configuration, no build secrets in its history")


def image_user(image):
    return quiet(["docker", "image", "inspect", "-f", "{{.Config.User}}", image]).stdout.strip()


def size(image):
    return int(quiet(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout.strip() or 0)


# -- 3. the runs ---------------------------------------------------------------------------------

def container(image, args, mounts, extra=(), timeout=900):
    """Run `args` in a container without a network; killed after `timeout` seconds (a hung rendezvous
    waits 2 x 300 s). Its hostname resolves to 127.0.0.1: torchrun's rendezvous connects to the host by
    name, which --network none leaves unresolvable (a machine on a network resolves its own)."""
    name = f"bert-distil-check-{os.getpid()}-{time.time_ns()}"
    cmd = ["docker", "run", "--rm", "--name", name, "--network", "none", "--hostname", "bert-distil",
           "--add-host", "bert-distil:127.0.0.1", "--shm-size", "1g", "-e", "HF_HUB_OFFLINE=1", *extra]
    for host, inside in mounts:
        cmd += ["-v", f"{host}:{inside}"]
    t = time.time()
    timer = threading.Timer(timeout, lambda: quiet(["docker", "kill", name]))
    timer.start()
    try:
        out = run(cmd + [image, *args], capture=True)
    finally:
        timer.cancel()
    return out, time.time() - t


def owned_files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_uid
            for d, _, files in os.walk(folder) for f in files}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="bert-distil:cpu", help="the tag to build (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="distillation steps of the quickstart's run (default: 5)")
    p.add_argument("--no-build", dest="build", action="store_false", help="run the existing --image as it is")
    p.add_argument("--keep", action="store_true", help="keep the host folders the containers wrote")
    args = p.parse_args(argv)
    start = time.time()
    if not shutil.which("docker") or quiet(["docker", "info"]).returncode:
        sys.exit("error: no Docker daemon in reach (docker info fails)")

    host = tempfile.mkdtemp(prefix="bert-distil-docker-check-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        if args.build:
            ensure_base()
            build(args.image, host)
        t_built = time.time()
        check_clean(args.image)
        user = image_user(args.image)
        for sub in ("teachers", "runs", "cache", "data"):
            os.makedirs(os.path.join(host, sub))
            os.chmod(os.path.join(host, sub), 0o777)  # whichever uid the container runs as can write there
        teachers, runs, cache, data = (os.path.join(host, s) for s in ("teachers", "runs", "cache", "data"))
        times = {}

        say(f"\n== the quickstart's teacher, as the image's user {user}")
        out, times["teacher"] = container(args.image, ["-m", "tools.make_teacher", "--quick"],
                                          [(teachers, f"{PROJECT}/teachers"), (cache, "/cache")])
        assert f"teacher written to {QUICKSTART_TEACHER}" in out
        # safetensors (0.8) writes model.safetensors readable by its owner only (mode 0600): the runs
        # below as another uid could not read this teacher. Opened to all as a user would (chmod a+r).
        quiet(["docker", "run", "--rm", "--network", "none", "--user", "0:0", "--entrypoint", "chmod", "-v",
               f"{teachers}:/t", args.image, "-R", "a+rX", "/t"])

        say(f"\n== {args.steps} distillation steps, read-only root filesystem (as under Apptainer), --out on a volume")
        out, times["distil"] = container(
            args.image, ["train.py", "--teacher", QUICKSTART_TEACHER, "--train", "corpus/train.txt",
                         "--valid", "corpus/valid.txt", "--out", "runs/quickstart", "--max-steps", str(args.steps),
                         "--no-progress"],
            [(teachers, f"{PROJECT}/teachers:ro"), (runs, f"{PROJECT}/runs"), (cache, "/cache")],
            ["--read-only", "--tmpfs", "/tmp"])
        assert "saved the student" in out and "valid_ppl=" in out

        say(f"\n== torchrun --nproc_per_node=2 on CPU, as --user {ARBITRARY_USER} (no account in the image), "
            "--out on another volume, /cache not mounted")
        out, times["torchrun"] = container(
            args.image, ["torchrun", "--nproc_per_node=2", "train.py", "--teacher", QUICKSTART_TEACHER,
                         "--train", "corpus/train.txt", "--out", "/data/ddp", "--max-steps", "2", "--batch-size", "4",
                         "--no-progress"],
            [(teachers, f"{PROJECT}/teachers:ro"), (data, "/data")], ["--user", ARBITRARY_USER])
        assert "saved the student" in out

        say("\n== torch.compile on CPU (inductor compiles C++ with the image's g++)")
        code = "import torch; f = torch.compile(lambda x: torch.sin(x) * 2); print('compiled:', f(torch.zeros(4)).tolist())"
        out, times["compile"] = container(args.image, ["-c", code], [])
        assert "compiled: [0.0, 0.0, 0.0, 0.0]" in out

        say("\n== the output in a fill-mask pipeline")
        code = ("from transformers import pipeline; fill = pipeline('fill-mask', model='runs/quickstart'); "
                "print('fill-mask:', [r['token_str'] for r in fill(f'The Python {fill.tokenizer.mask_token} "
                "is a collection of modules.')])")
        out, times["fill-mask"] = container(args.image, ["-c", code], [(runs, f"{PROJECT}/runs:ro")])
        assert "fill-mask: [" in out

        say("\n== on the host, after the containers are gone")
        quick, ddp = owned_files(os.path.join(runs, "quickstart")), owned_files(os.path.join(data, "ddp"))
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl", "run.json"):
            assert name in quick and name in ddp, f"{name} missing from a run's --out"
        uid, other = int(user.split(":")[0]), int(ARBITRARY_USER.split(":")[0])
        assert set(quick.values()) == {uid}, f"runs/quickstart is owned by {set(quick.values())}, not {uid}"
        assert set(ddp.values()) == {other}, f"/data/ddp is owned by {set(ddp.values())}, not {other}"
        evals = [json.loads(line) for line in open(os.path.join(runs, "quickstart", "metrics.jsonl"))]
        last = [m for m in evals if "valid_ppl" in m][-1]
        say(f"{runs}/quickstart: {len(quick)} files, owned by uid {uid}; valid_ppl={last['valid_ppl']:.1f} "
            f"teacher_ppl={last['teacher_ppl']:.1f} after {args.steps} steps")
        say(f"{data}/ddp: {len(ddp)} files, owned by uid {other}")
        say(f"{cache}: {sorted(os.listdir(cache))} (the caches survive too: the tokenized corpus, torch's)")

        say(f"\nimage {args.image}: {size(args.image) / 1e9:.2f} GB ({BASE} {size(BASE) / 1e6:.0f} MB)")
        say("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                  [("build", t_built - start), *times.items()]))
        say(f"docker check passed in {(time.time() - start) / 60:.1f} min")
    finally:
        if args.keep:
            say(f"kept {host}")
        else:  # the containers' users own what they wrote: remove it from a container, as root
            quiet(["docker", "run", "--rm", "--network", "none", "--user", "0:0", "--entrypoint", "sh", "-v",
                   f"{host}:/host", args.image, "-c", "rm -rf /host/*"])
            shutil.rmtree(host, ignore_errors=True)


if __name__ == "__main__":
    main()
