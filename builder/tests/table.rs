//! A table of every Dockerfile construct the frontend checks, with the
//! checked instruction it must produce (as JSON) or the error it must give.

use kiln_builder::frontend::{
    self,
    instructions::{check, Expander},
};

/// (Dockerfile text, expected JSON of the checked instruction, or
/// `ERR <message>` / `PARSE-ERR <message>`).
const TABLE: &[(&str, &str)] = &[
    ("FROM alpine", r#"{"instruction":"from","args":{"image":"alpine","platform":null,"name":null}}"#),
    ("FROM --platform=linux/arm64 alpine:3.19 AS Builder", r#"{"instruction":"from","args":{"image":"alpine:3.19","platform":"linux/arm64","name":"builder"}}"#),
    ("FROM $IMG", r#"{"instruction":"from","args":{"image":"busybox","platform":null,"name":null}}"#),
    ("FROM a b", r#"ERR FROM requires either one or three arguments: FROM image [AS name]"#),
    ("RUN echo $HOME", r#"{"instruction":"run","args":{"command":{"shell":"echo $HOME"},"mounts":[],"network":null,"security":null}}"#),
    ("RUN [\"echo\", \"$HOME\"]", r#"{"instruction":"run","args":{"command":{"exec":["echo","$HOME"]},"mounts":[],"network":null,"security":null}}"#),
    ("RUN [\"echo\", 1]", r#"PARSE-ERR when using JSON array syntax, arrays must be comprised of strings only"#),
    ("RUN ['bad json']", r#"{"instruction":"run","args":{"command":{"shell":"['bad json']"},"mounts":[],"network":null,"security":null}}"#),
    ("RUN --mount=type=bind,source=go.sum,target=go.sum,from=deps go mod download", r#"{"instruction":"run","args":{"command":{"shell":"go mod download"},"mounts":[{"type":"bind","target":"go.sum","source":"go.sum","from":"deps","readwrite":false}],"network":null,"security":null}}"#),
    ("RUN --mount=type=cache,id=apt,target=/var/cache/apt,sharing=locked,mode=0700,uid=1,gid=2 apt-get update", r#"{"instruction":"run","args":{"command":{"shell":"apt-get update"},"mounts":[{"type":"cache","target":"/var/cache/apt","id":"apt","sharing":"locked","from":null,"source":null,"readonly":false,"mode":448,"uid":1,"gid":2}],"network":null,"security":null}}"#),
    ("RUN --mount=type=tmpfs,target=/tmp,size=1g x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[{"type":"tmpfs","target":"/tmp","size":1073741824}],"network":null,"security":null}}"#),
    ("RUN --mount=type=secret,id=aws,target=/root/.aws/credentials,required=true,mode=0440 x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[{"type":"secret","id":"aws","target":"/root/.aws/credentials","env":null,"required":true,"mode":288,"uid":0,"gid":0}],"network":null,"security":null}}"#),
    ("RUN --mount=type=secret,id=tok,env=TOKEN x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[{"type":"secret","id":"tok","target":null,"env":"TOKEN","required":false,"mode":256,"uid":0,"gid":0}],"network":null,"security":null}}"#),
    ("RUN --mount=type=ssh,id=gh,required x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[{"type":"ssh","id":"gh","target":"/run/buildkit/ssh_agent.0","required":true,"mode":384,"uid":0,"gid":0}],"network":null,"security":null}}"#),
    ("RUN --mount=type=ssh --mount=type=ssh,id=b x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[{"type":"ssh","id":"default","target":"/run/buildkit/ssh_agent.0","required":false,"mode":384,"uid":0,"gid":0},{"type":"ssh","id":"b","target":"/run/buildkit/ssh_agent.1","required":false,"mode":384,"uid":0,"gid":0}],"network":null,"security":null}}"#),
    ("RUN --network=host --security=sandbox x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[],"network":"host","security":"sandbox"}}"#),
    ("RUN --device=/dev/fuse x", r#"{"instruction":"run","args":{"command":{"shell":"x"},"mounts":[],"network":null,"security":null,"devices":[{"name":"/dev/fuse","required":false}]}}"#),
    ("RUN <<EOF\necho a\nEOF", r#"{"instruction":"run","args":{"command":{"heredoc":{"name":"EOF","content":"echo a\n","shebang":false}},"mounts":[],"network":null,"security":null}}"#),
    ("RUN <<-EOT bash\n\techo a\n\tEOT", r#"{"instruction":"run","args":{"command":{"shell":"<<-EOT bash\n\techo a\nEOT"},"mounts":[],"network":null,"security":null}}"#),
    ("RUN python3 <<'PY'\nprint('$x')\nPY", r#"{"instruction":"run","args":{"command":{"shell":"python3 <<'PY'\nprint('$x')\nPY"},"mounts":[],"network":null,"security":null}}"#),
    ("CMD [\"nginx\", \"-g\", \"daemon off;\"]", r#"{"instruction":"cmd","args":{"exec":["nginx","-g","daemon off;"]}}"#),
    ("CMD nginx -g 'daemon off;'", r#"{"instruction":"cmd","args":{"shell":"nginx -g 'daemon off;'"}}"#),
    ("CMD", r#"{"instruction":"cmd","args":{"shell":""}}"#),
    ("ENTRYPOINT [\"/entry.sh\"]", r#"{"instruction":"entrypoint","args":{"exec":["/entry.sh"]}}"#),
    ("ENTRYPOINT exec app", r#"{"instruction":"entrypoint","args":{"shell":"exec app"}}"#),
    ("SHELL [\"powershell\", \"-Command\"]", r#"{"instruction":"shell","args":["powershell","-Command"]}"#),
    ("SHELL /bin/bash", r#"ERR SHELL requires the arguments to be in JSON form, e.g. SHELL ["/bin/sh", "-c"]"#),
    ("ENV PATH=/opt/bin:$PATH", r#"{"instruction":"env","args":[{"key":"PATH","value":"/opt/bin:"}]}"#),
    ("ENV A=1 B=\"two words\" C=three\\ words", r#"{"instruction":"env","args":[{"key":"A","value":"1"},{"key":"B","value":"two words"},{"key":"C","value":"three words"}]}"#),
    ("ENV LEGACY some value here", r#"{"instruction":"env","args":[{"key":"LEGACY","value":"some value here"}]}"#),
    ("ENV ONLYKEY", r#"PARSE-ERR ENV must have two arguments; write `ENV name=value`"#),
    ("ENV A=1 B", r#"PARSE-ERR syntax error - can't find = in "B"; must be of the form name=value"#),
    ("ARG VERSION", r#"{"instruction":"arg","args":[{"key":"VERSION","default":null}]}"#),
    ("ARG VERSION=1.0 OTHER=\"x y\"", r#"{"instruction":"arg","args":[{"key":"VERSION","default":"1.0"},{"key":"OTHER","default":"\"x y\""}]}"#),
    ("LABEL org.opencontainers.image.title=\"kiln\" version=1", r#"{"instruction":"label","args":[{"key":"org.opencontainers.image.title","value":"kiln"},{"key":"version","value":"1"}]}"#),
    ("LABEL maintainer Someone <a@b.c>", r#"{"instruction":"label","args":[{"key":"maintainer","value":"Someone <a@b.c>"}]}"#),
    ("EXPOSE 80 443/tcp 53/udp 8000-8100", r#"{"instruction":"expose","args":[{"start":80,"end":80,"protocol":"tcp"},{"start":443,"end":443,"protocol":"tcp"},{"start":53,"end":53,"protocol":"udp"},{"start":8000,"end":8100,"protocol":"tcp"}]}"#),
    ("EXPOSE 80/ftp", r#"ERR invalid containerPort: 80/ftp; use PORT, PORT-PORT, optionally with /tcp, /udp or /sctp"#),
    ("EXPOSE abc", r#"ERR invalid containerPort: abc; use PORT, PORT-PORT, optionally with /tcp, /udp or /sctp"#),
    ("WORKDIR /app/$SUB", r#"{"instruction":"workdir","args":"/app/sub"}"#),
    ("WORKDIR a b", r#"{"instruction":"workdir","args":"a b"}"#),
    ("USER 1000:1000", r#"{"instruction":"user","args":"1000:1000"}"#),
    ("USER", r#"ERR USER requires at least one argument"#),
    ("VOLUME /data /logs", r#"{"instruction":"volume","args":["/data","/logs"]}"#),
    ("VOLUME [\"/data\"]", r#"{"instruction":"volume","args":["/data"]}"#),
    ("COPY . /app/", r#"{"instruction":"copy","args":{"sources":[{"path":"."}],"dest":"/app/","from":null,"chown":null,"chmod":null,"link":false,"parents":false,"excludes":[]}}"#),
    ("COPY [\"a b\", \"/c d/\"]", r#"{"instruction":"copy","args":{"sources":[{"path":"a b"}],"dest":"/c d/","from":null,"chown":null,"chmod":null,"link":false,"parents":false,"excludes":[]}}"#),
    ("COPY --from=build --chown=app:app --chmod=755 --link /out /usr/bin/", r#"{"instruction":"copy","args":{"sources":[{"path":"/out"}],"dest":"/usr/bin/","from":"build","chown":"app:app","chmod":{"octal":493},"link":true,"parents":false,"excludes":[]}}"#),
    ("COPY --parents ./src/**/*.go /app/", r#"{"instruction":"copy","args":{"sources":[{"path":"./src/**/*.go"}],"dest":"/app/","from":null,"chown":null,"chmod":null,"link":false,"parents":true,"excludes":[]}}"#),
    ("COPY --exclude=*.tmp --exclude=.git . /src", r#"{"instruction":"copy","args":{"sources":[{"path":"."}],"dest":"/src","from":null,"chown":null,"chmod":null,"link":false,"parents":false,"excludes":["*.tmp",".git"]}}"#),
    ("COPY --from=$IMG a /b", r#"ERR variable expansion is not supported for --from ("$IMG"); define a new stage with FROM using ARG from global scope as a workaround"#),
    ("COPY --exclude=$SUB a /b", r#"{"instruction":"copy","args":{"sources":[{"path":"a"}],"dest":"/b","from":null,"chown":null,"chmod":null,"link":false,"parents":false,"excludes":["$SUB"]}}"#),
    ("COPY --chmod=go-w,u+x a /b", r#"{"instruction":"copy","args":{"sources":[{"path":"a"}],"dest":"/b","from":null,"chown":null,"chmod":{"symbolic":"go-w,u+x"},"link":false,"parents":false,"excludes":[]}}"#),
    ("COPY --chmod=8 a /b", r#"ERR invalid chmod "8"; use an octal mode such as 0755 or a symbolic one such as u=rwX,go=rX"#),
    ("COPY --keep-git-dir a /b", r#"ERR unknown flag: --keep-git-dir for COPY"#),
    ("COPY onlyone", r#"ERR COPY requires at least two arguments, but only one was provided; a destination could not be determined"#),
    ("COPY <<EOF /etc/motd\nwelcome $USER\nEOF", r#"{"instruction":"copy","args":{"sources":[{"heredoc":{"name":"EOF","content":"welcome \n"}}],"dest":"/etc/motd","from":null,"chown":null,"chmod":null,"link":false,"parents":false,"excludes":[]}}"#),
    ("ADD https://example.com/a.tar.gz /tmp/", r#"{"instruction":"add","args":{"sources":[{"path":"https://example.com/a.tar.gz"}],"dest":"/tmp/","chown":null,"chmod":null,"link":false,"keep_git_dir":false,"checksum":null,"unpack":null,"excludes":[]}}"#),
    ("ADD --checksum=sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d https://example.com/x /x", r#"{"instruction":"add","args":{"sources":[{"path":"https://example.com/x"}],"dest":"/x","chown":null,"chmod":null,"link":false,"keep_git_dir":false,"checksum":"sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d","unpack":null,"excludes":[]}}"#),
    ("ADD --keep-git-dir=true git@github.com:moby/buildkit.git#v0.12:docs /docs", r#"{"instruction":"add","args":{"sources":[{"path":"git@github.com:moby/buildkit.git#v0.12:docs"}],"dest":"/docs","chown":null,"chmod":null,"link":false,"keep_git_dir":true,"checksum":null,"unpack":null,"excludes":[]}}"#),
    ("ADD --unpack https://example.com/a.tar.gz /tmp/", r#"{"instruction":"add","args":{"sources":[{"path":"https://example.com/a.tar.gz"}],"dest":"/tmp/","chown":null,"chmod":null,"link":false,"keep_git_dir":false,"checksum":null,"unpack":true,"excludes":[]}}"#),
    ("ADD --from=x a b", r#"ERR unknown flag: --from for ADD"#),
    ("ADD --chown=1 --link=false a b", r#"{"instruction":"add","args":{"sources":[{"path":"a"}],"dest":"b","chown":"1","chmod":null,"link":false,"keep_git_dir":false,"checksum":null,"unpack":null,"excludes":[]}}"#),
    ("ONBUILD RUN make", r#"{"instruction":"onbuild","args":{"expression":"RUN make","instruction":"run"}}"#),
    ("ONBUILD ADD . /app/src", r#"{"instruction":"onbuild","args":{"expression":"ADD . /app/src","instruction":"add"}}"#),
    ("ONBUILD ONBUILD RUN x", r#"ERR ONBUILD isn't allowed as an ONBUILD trigger"#),
    ("ONBUILD", r#"ERR ONBUILD requires at least one argument"#),
    ("HEALTHCHECK NONE", r#"{"instruction":"healthcheck","args":"none"}"#),
    ("HEALTHCHECK CMD curl -f http://localhost/ || exit 1", r#"{"instruction":"healthcheck","args":{"cmd":{"command":{"shell":"curl -f http://localhost/ || exit 1"},"interval":null,"timeout":null,"start_period":null,"start_interval":null,"retries":null}}}"#),
    ("HEALTHCHECK --interval=1m --timeout=10s --start-period=5s --start-interval=2s --retries=5 CMD [\"check\"]", r#"{"instruction":"healthcheck","args":{"cmd":{"command":{"exec":["check"]},"interval":{"secs":60,"nanos":0},"timeout":{"secs":10,"nanos":0},"start_period":{"secs":5,"nanos":0},"start_interval":{"secs":2,"nanos":0},"retries":5}}}"#),
    ("HEALTHCHECK --interval=10 CMD x", r#"ERR invalid duration "10" for --interval; use a Go duration such as 30s or 1m30s"#),
    ("HEALTHCHECK --bogus=1 CMD x", r#"ERR unknown flag: --bogus for HEALTHCHECK"#),
    ("STOPSIGNAL SIGTERM", r#"{"instruction":"stopsignal","args":"SIGTERM"}"#),
    ("STOPSIGNAL", r#"ERR STOPSIGNAL requires at least one argument"#),
    ("MAINTAINER Jane Doe <jane@example.com>", r#"{"instruction":"maintainer","args":"Jane Doe <jane@example.com>"}"#),
    ("FROB x", r#"ERR unknown instruction: FROB; did you mean FROM?"#),
    ("STOPSIGNAL SIGNOPE", r#"ERR invalid signal: SIGNOPE; use a name such as SIGTERM or a nonzero number"#),
    ("copy --FROM=x a b", r#"ERR unknown flag: --FROM for COPY"#),
];

#[test]
fn every_construct() {
    let env = vec![
        ("HOME".to_string(), "/root".to_string()),
        ("SUB".into(), "sub".into()),
        ("IMG".into(), "busybox".into()),
    ];
    let mut failures = Vec::new();
    for (input, want) in TABLE {
        let got = match frontend::parse(input.as_bytes(), "Dockerfile") {
            Err(e) => format!("PARSE-ERR {}", e.kind),
            Ok(ast) => {
                let mut ex = Expander::new('\\', &env);
                match check(&ast.nodes[0], &mut ex) {
                    Ok(i) => serde_json::to_string(&i).unwrap(),
                    Err(e) => format!("ERR {}", e.kind),
                }
            }
        };
        if got != *want {
            failures.push(format!("{input:?}\n  want {want}\n   got {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
}
