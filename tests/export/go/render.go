// Command render executes Ollama chat templates the way Ollama's server feeds them, for tunery's parity tests.
//
// It reads a JSON list of cases {"template", "messages": [{"role", "content"}], "system"} on stdin and writes a
// JSON list of {"text", "error"} on stdout. For each case, as Ollama's chat handler and template package do, the
// Modelfile SYSTEM ("system") is prepended as a system message when the first message is not one; consecutive
// messages of one role are merged with a blank line (tool messages excepted) and every system message is also
// joined into .System; the template is parsed with missingkey=zero and Ollama's "json" function, and executed on
// {System, Messages, Tools, Response: ""}.
//
// Build and run: cd tests/export/go && go build -o /tmp/render . && /tmp/render < cases.json
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type testCase struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
	System   string    `json:"system"`
}

type result struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

// funcs are the functions Ollama registers on every template.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(c testCase) (string, error) {
	msgs := append([]message(nil), c.Messages...)
	if len(msgs) > 0 && msgs[0].Role != "system" && c.System != "" {
		msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, collated := collate(msgs)
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System": system, "Messages": collated, "Tools": nil, "Response": "", "Think": false, "IsThinkSet": false,
	})
	return b.String(), err
}

func main() {
	var cases []testCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "render: bad input:", err)
		os.Exit(2)
	}
	results := make([]result, len(cases))
	for i, c := range cases {
		text, err := render(c)
		results[i].Text = text
		if err != nil {
			results[i].Error = err.Error()
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(2)
	}
}
